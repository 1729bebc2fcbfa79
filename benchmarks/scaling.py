"""Scaling law of ECT (Sec. 4.2): fit FD = K · C^α over tuning budgets C and report the Pearson r of log C vs log FD.

Each budget is a complete ECT run (its own stage schedule, d = C / stages) from the same pretrained diffusion model;
budgets double, so the points are evenly spaced in log C. The fit (`ectune.analysis.fit_power_law`) is a pure,
unit-tested function: log-log least squares, and scipy.stats.pearsonr for r and its p-value.

    python benchmarks/scaling.py --size smoke            # 2-core CPU, a few minutes, tiny net, n = 200
    python benchmarks/scaling.py --size full --out DIR   # one GPU, n = 10k
    python benchmarks/scaling.py --size smoke --init runs/paper_table-smoke/pretrain --rate 12   # reuse a model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import SIZES as TABLE_SIZES  # noqa: E402  (same nets, batches and learning rates)
from paper_table import Size, _snap, log_log_axes, pretrain, save_log_log, tune_and_eval  # noqa: E402

from ectune.analysis import PowerLawFit, fit_power_law  # noqa: E402
from ectune.data import open_dataset  # noqa: E402
from ectune.evaluation import describe_hardware, load_extractor, reference_for_data  # noqa: E402
from ectune.runtime.checkpoint import atomic_write_text, read_model_meta  # noqa: E402
from ectune.runtime.device import resolve_device  # noqa: E402


@dataclass(frozen=True)
class ScalingSize:
    table: Size  # net, batch, learning rates, n, reference size
    pretrain_seconds: float
    base_seconds: float  # tuning time of the smallest budget; budgets are base × 2^i
    doublings: int  # number of budgets


SIZES = {
    "smoke": ScalingSize(table=replace(TABLE_SIZES["smoke"], n=200), pretrain_seconds=45.0, base_seconds=8.0, doublings=4),
    "full": ScalingSize(table=TABLE_SIZES["full"], pretrain_seconds=70.0, base_seconds=6.0, doublings=5),
}


def plot_fit(budgets: np.ndarray, fds: dict[str, np.ndarray], fits: dict[str, PowerLawFit], path: Path, metric: str) -> None:
    fig, ax = log_log_axes()
    grid = np.geomspace(budgets.min(), budgets.max(), 50)
    for (label, y), marker in zip(fds.items(), "os"):
        f = fits[label]
        line = ax.plot(budgets, y, marker, label=f"ECT {label}")[0]
        ax.plot(grid, f.predict(grid), "-", color=line.get_color(), alpha=0.7,
                label=f"{f.K:.3g}·C^{f.alpha:.3f} (r = {f.r:.4f}, p = {f.p_value:.2g})")
    save_log_log(fig, ax, path, xlabel="tuning budget C (kimg)", ylabel=metric, legend_fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/scaling-SIZE)")
    p.add_argument("--init", type=Path, default=None, help="pretrained ectune model to tune from (skips pretraining)")
    p.add_argument("--rate", type=float, default=0.0, help="diffusion training img/s to size budgets with (with --init)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    ss = SIZES[a.size]
    size = ss.table
    if size.needs_cuda and not torch.cuda.is_available():
        print(f"scaling --size {a.size} needs a CUDA GPU and none is available; nothing done (run --size smoke on a CPU).")
        return 0
    device = resolve_device(a.device)
    out = a.out or Path("runs") / f"scaling-{a.size}"
    if any(out.glob("tune-*")):
        raise SystemExit(f"{out} holds an earlier benchmark; give a new --out (runs would otherwise resume).")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)

    hardware = describe_hardware(device)
    log(f"scaling --size {a.size} on {hardware}")
    if a.init is not None:
        init, rate = a.init, a.rate
        if rate <= 0:
            raise SystemExit("--init needs --rate IMG_PER_S (diffusion training throughput) to size the budgets")
    else:
        init, _, _, rate = pretrain(out, replace(size, pretrain_seconds=ss.pretrain_seconds), log)
    cfg, _ = read_model_meta(init)
    ext = load_extractor("lite0", device=device)
    data = open_dataset(replace(cfg.data, split="train"))
    ref = reference_for_data(data, "train", ext, cache_dir=out / "cache", max_images=size.ref_max, batch=size.eval_batch)

    base = _snap(rate / 1.6 * ss.base_seconds / 1000, size.batch)
    budgets = [_snap(base * 2**i, size.batch) for i in range(ss.doublings)]
    log(f"budgets (kimg): {budgets}")
    runs: list[dict[str, Any]] = []
    for kimg in budgets:
        r = tune_and_eval(f"ECT {kimg:g}kimg", "ect", lambda c: c, init, out, size, kimg, curve=False, steps=(1, 2),
                          ref=ref, device=device, ext=ext, log=log)
        runs.append(r)
    C = np.array([r["tune_kimg"] for r in runs])
    fds = {"1 step": np.array([r["fd"]["1step"] for r in runs]), "2 steps": np.array([r["fd"]["2step"] for r in runs])}
    fits = {label: fit_power_law(C, y) for label, y in fds.items()}
    metric = ext.report_name
    plot_fit(C, fds, fits, out / "scaling.png", metric)
    lines = ["| sampler | K (C in kimg) | α | Pearson r | p-value | budgets (kimg) |", "|---|---:|---:|---:|---:|---|"]
    for label, f in fits.items():
        lines.append(f"| ECT {label} | {f.K:.4g} | {f.alpha:.4f} | {f.r:.4f} | {f.p_value:.3g} | {', '.join(f'{c:g}' for c in C)} |")
    table = "\n".join(lines) + (f"\n\n{metric}, n = {size.n} samples vs {ref.count} training images; {hardware}; "
                                f"total {time.time() - start:.0f}s.\n")
    points = [{"kimg": float(c), **{k: float(v[i]) for k, v in fds.items()}, "train_seconds": r["train_seconds"]}
              for i, (c, r) in enumerate(zip(C, runs))]
    record = {"size": a.size, "hardware": hardware, "metric": metric, "n": size.n, "reference_images": ref.count,
              "points": points, "fits": {k: vars(f) for k, f in fits.items()}, "total_seconds": time.time() - start}
    atomic_write_text(out / "scaling.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "scaling.md", table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
