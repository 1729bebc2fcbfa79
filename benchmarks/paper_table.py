"""Reproduce the shape of the paper's comparison on Fashion-MNIST with FD-Lite0, from ONE pretrained diffusion model.

Rows (all tuned for the same number of images from the same pretrained weights):
  diffusion + EDM Heun (35 NFE) | ECT 1 and 2 steps | iCT 1 and 2 steps | ECT const mapping (Eq. 17) |
  ECT without dropout | ECT with three other timestep weightings w̄ (Tab. 3)
plus a plot of FD vs tuning images for ECT and iCT (evaluated at several budgets of the same runs) and a JSON file of
every number.

    python benchmarks/paper_table.py --size smoke            # 2-core CPU, < 10 min, tiny net, n = 200 (biased FD)
    python benchmarks/paper_table.py --size cpu              # 2-core CPU, ~40 min, same net trained longer, n = 1000
    python benchmarks/paper_table.py --size full --out DIR   # one GPU, < 5 min including pretraining, n = 10k

Budgets are set in seconds of training and converted to images once, from the pretraining throughput measured on
the machine, so both sizes fit their time limits on unknown hardware; every tuning run then gets exactly the same
number of images (reported in the table). FD needs no network: the Lite0 weights ship in a Python package.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ectune.config import NetConfig, RunConfig
from ectune.data import open_dataset
from ectune.evaluation import describe_hardware, evaluate_model, load_extractor, reference_for_data
from ectune.metrics import FeatureExtractor, FeatureStats
from ectune.model import load_model
from ectune.nets import SMALL_CONFIGS
from ectune.presets import get_preset
from ectune.runtime.checkpoint import atomic_write_text, read_model_meta
from ectune.runtime.device import resolve_device
from ectune.training.loop import train

# A 3-level DDPM++ without attention: the smallest net that still learns Fashion-MNIST shapes on a CPU in a minute.
MICRO_NET = replace(SMALL_CONFIGS["tiny"], model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=())


@dataclass(frozen=True)
class Size:
    """Everything a benchmark size fixes. Seconds become images once the pretraining throughput is known."""

    net: NetConfig
    batch: int
    pretrain_seconds: float
    tune_seconds: float  # per tuning run (ECT/iCT step ≈ 1.6× a diffusion step: student + target pass)
    pretrain_lr: float
    tune_lr: float
    pretrain_halflife_kimg: float
    tune_halflife_frac: float  # EMA half-life as a fraction of the tuning budget
    n: int  # samples per FD
    ref_max: int  # training images in the reference statistics (0 = all 60k)
    curve: tuple[float, ...]  # fractions of the tuning budget where the ECT/iCT curve is evaluated
    ablation_steps: tuple[int, ...]
    eval_batch: int
    chunk_steps: int  # optimiser steps per pretraining chunk (each chunk restarts `train`, which costs ~1 s)
    needs_cuda: bool


SIZES: dict[str, Size] = {
    "smoke": Size(net=MICRO_NET, batch=32, pretrain_seconds=75.0, tune_seconds=18.0, pretrain_lr=2e-3, tune_lr=5e-4,
                  pretrain_halflife_kimg=0.25, tune_halflife_frac=0.1, n=200, ref_max=500, curve=(0.25, 0.5, 1.0),
                  ablation_steps=(1,), eval_batch=100, chunk_steps=20, needs_cuda=False),
    "cpu": Size(net=MICRO_NET, batch=64, pretrain_seconds=900.0, tune_seconds=120.0, pretrain_lr=2e-3, tune_lr=5e-4,
                pretrain_halflife_kimg=2.0, tune_halflife_frac=0.1, n=1000, ref_max=5000, curve=(0.125, 0.25, 0.5, 1.0),
                ablation_steps=(1, 2), eval_batch=250, chunk_steps=50, needs_cuda=False),
    "full": Size(net=SMALL_CONFIGS["small"], batch=512, pretrain_seconds=70.0, tune_seconds=12.0, pretrain_lr=2e-3,
                 tune_lr=4e-4, pretrain_halflife_kimg=50.0, tune_halflife_frac=0.05, n=10_000, ref_max=0,
                 curve=(0.125, 0.25, 0.5, 1.0), ablation_steps=(1, 2), eval_batch=1000, chunk_steps=300,
                 needs_cuda=True),
}

# Timestep weightings of the ablation rows (Tab. 3); the main ECT row uses the preset's 1/(t - r).
WEIGHTING_ROWS = {"inv_t": "1/t", "one": "1", "inv_t2_plus_inv_sigma_data2": "1/t²+1/σ_d²"}


def variants() -> dict[str, tuple[str, Callable[[RunConfig], RunConfig]]]:
    """Row name -> (objective, edit of the tuning config); all start from the same pretrained model."""
    rows: dict[str, tuple[str, Callable[[RunConfig], RunConfig]]] = {
        "ECT": ("ect", lambda c: c),
        "iCT": ("ict", lambda c: c),
        "ECT, const mapping": ("ect", lambda c: replace(c, objective=replace(c.objective, mapping="const"))),
        "ECT, no dropout": ("ect", lambda c: replace(c, net=replace(c.net, dropout=0.0))),
    }
    for key, label in WEIGHTING_ROWS.items():
        rows[f"ECT, w̄ = {label}"] = ("ect", lambda c, key=key: replace(c, objective=replace(c.objective, weighting=key)))
    return rows


def _train_cfg(cfg: RunConfig, size: Size, *, total_kimg: float, lr: float, halflife_kimg: float) -> RunConfig:
    """The preset with this size's net (unconditional, images padded to its resolution), batch, budget and EMA; no
    sample grids or periodic saves (they cost time)."""
    return replace(
        cfg,
        net=replace(size.net, dropout=cfg.net.dropout),
        data=replace(cfg.data, resolution=size.net.img_resolution, use_labels=size.net.label_dim > 0),
        optim=replace(cfg.optim, lr=lr),
        ema=replace(cfg.ema, kind="halflife", halflife_kimg=halflife_kimg),
        train=replace(cfg.train, total_kimg=total_kimg, batch=size.batch, precision="auto"),
        runtime=replace(cfg.runtime, sample_kimg=0.0, save_kimg=1e9, status_kimg=1e9, eval_kimg=0.0, compile=False),
    )


def pretrain(out: Path, size: Size, log: Callable[[str], None]) -> tuple[Path, float, float, float]:
    """Diffusion pretraining for size.pretrain_seconds (in chunks); returns (model, kimg, seconds, img/s)."""
    chunk = size.batch * size.chunk_steps / 1000
    cfg = _train_cfg(get_preset("fashion-mnist", "pretrain"), size, total_kimg=1e6, lr=size.pretrain_lr,
                     halflife_kimg=size.pretrain_halflife_kimg)  # total only bounds the run: diffusion has no schedule
    run = out / "pretrain"
    t0, kimg, rates = time.time(), 0.0, []
    while time.time() - t0 < size.pretrain_seconds:
        tc = time.time()
        kimg = round(kimg + chunk, 6)
        train(cfg, run, command="pretrain", until_kimg=kimg, show_progress=False)
        rates.append(chunk * 1000 / (time.time() - tc))
    seconds = time.time() - t0
    # The median chunk (the first one holds start-up costs): one slow chunk on a shared machine must not shrink
    # every tuning budget.
    rate = statistics.median(rates[1:] or rates)
    log(f"pretrained {kimg:.2f} kimg in {seconds:.0f}s (median chunk {rate:.0f} img/s)")
    return run / "model.safetensors", kimg, seconds, rate


def tune_and_eval(name: str, objective: str, edit: Callable[[RunConfig], RunConfig], init: Path, out: Path, size: Size, tune_kimg: float,
                  curve: bool, steps: tuple[int, ...], ref: FeatureStats, device: torch.device,
                  ext: FeatureExtractor, log: Callable[[str], None], *, trainer: Callable[..., Any] = train) -> dict[str, Any]:
    """Tune one variant for tune_kimg (in chunks at the curve points when `curve`), evaluating as it goes.
    `trainer` runs each chunk (`train`'s signature; benchmarks/precision_tuning.py passes one that emulates TF32)."""
    base = get_preset("fashion-mnist", "tune", objective=objective)
    cfg = edit(_train_cfg(base, size, total_kimg=tune_kimg, lr=size.tune_lr,
                          halflife_kimg=max(tune_kimg * size.tune_halflife_frac, size.batch / 1000)))
    run = out / ("tune-" + "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-"))
    points = sorted(set((size.curve if curve else ()) + (1.0,)))
    train_seconds, eval_seconds, history = 0.0, 0.0, []
    for frac in points:
        kimg = _snap(tune_kimg * frac, size.batch)
        t0 = time.time()
        trainer(cfg, run, init=init, command="tune", until_kimg=kimg, show_progress=False)
        train_seconds += time.time() - t0
        model, mcfg, extra = load_model(run, device=device)
        final = frac == 1.0
        res = evaluate_model(model, mcfg, ref_stats=ref, extractor=ext, steps=steps if final else (1,), n=size.n,
                             heun=False, device=device, batch=size.eval_batch)
        eval_seconds += res["seconds"]
        history.append({"kimg": extra["nimg"] / 1000, "fd": res["fd"]})
        log(f"{name}: {extra['nimg'] / 1000:.2f} kimg  " + "  ".join(f"{k} {v:.2f}" for k, v in res["fd"].items()))
    return {"name": name, "objective": objective, "tune_kimg": history[-1]["kimg"], "fd": history[-1]["fd"],
            "curve": history, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "config_diff": _describe_edit(base, cfg)}


def _snap(kimg: float, batch: int) -> float:
    """A budget that is a whole number of steps (and at least one)."""
    return max(1, round(kimg * 1000 / batch)) * batch / 1000


def _describe_edit(base: RunConfig, cfg: RunConfig) -> dict[str, Any]:
    return {"mapping": cfg.objective.mapping, "weighting": cfg.objective.weighting, "dropout": cfg.net.dropout,
            "lr": cfg.optim.lr, "ema_halflife_kimg": cfg.ema.halflife_kimg, "batch": cfg.train.batch}


def markdown_table(rows: list[dict[str, Any]], *, metric: str, hardware: str, n: int, note: str) -> str:
    lines = [f"| method | NFE | {metric} | tuning images | train s | eval s | hardware |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fd']:.2f} | {r['images']} | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} | {hardware} |")
    return "\n".join(lines) + f"\n\n{metric} on n = {n} samples vs the Fashion-MNIST training set. {note}\n"


def log_log_axes():
    """A figure and axes for an FD-vs-budget plot (headless matplotlib); finish it with `save_log_log`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.5, 3.8))


def save_log_log(fig, ax, path: Path, *, xlabel: str, ylabel: str, legend_fontsize: int) -> None:
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict[str, dict[str, Any]], heun_fd: float, path: Path, metric: str) -> None:
    fig, ax = log_log_axes()
    for name, style in (("ECT", "o-"), ("iCT", "s--")):
        pts = [(h["kimg"], h["fd"]["1step"]) for h in results[name]["curve"]]
        ax.plot(*zip(*pts), style, label=f"{name}, 1 step")
        two = results[name]["fd"].get("2step")
        if two is not None:
            ax.plot([pts[-1][0]], [two], style[0], mfc="none", ms=9, label=f"{name}, 2 steps (final)")
    ax.axhline(heun_fd, color="grey", ls=":", label="diffusion, Heun 35 NFE")
    save_log_log(fig, ax, path, xlabel="tuning images (kimg)", ylabel=metric, legend_fontsize=8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="smoke")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/paper_table-SIZE)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    size = SIZES[a.size]
    if size.needs_cuda and not torch.cuda.is_available():
        print(f"paper_table --size {a.size} needs a CUDA GPU and none is available; nothing done "
              "(run --size smoke on a CPU).")
        return 0
    device = resolve_device(a.device)
    out = a.out or Path("runs") / f"paper_table-{a.size}"
    if (out / "pretrain").exists() or any(out.glob("tune-*")):
        raise SystemExit(f"{out} holds an earlier benchmark; give a new --out (runs would otherwise resume).")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"

    def log(msg: str) -> None:
        line = f"[{time.time() - start:6.0f}s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    start = time.time()
    hardware = describe_hardware(device)
    log(f"paper_table --size {a.size} on {hardware}")
    init, pre_kimg, pre_seconds, rate = pretrain(out, size, log)

    ext = load_extractor("lite0", device=device)
    cfg, _ = read_model_meta(init)
    data = open_dataset(replace(cfg.data, split="train"))
    t0 = time.time()
    ref = reference_for_data(data, "train", ext, cache_dir=out / "cache", max_images=size.ref_max, batch=size.eval_batch)
    ref_seconds = time.time() - t0
    log(f"reference statistics of {ref.count} training images in {ref_seconds:.0f}s")

    model, mcfg, _ = load_model(init, device=device)
    heun = evaluate_model(model, mcfg, ref_stats=ref, extractor=ext, steps=(), heun=True, n=size.n, device=device,
                          batch=size.eval_batch)
    log(f"diffusion + Heun ({mcfg.sample.heun_steps} steps): {heun['fd']['heun']:.2f}")

    tune_kimg = _snap(rate / 1.6 * size.tune_seconds / 1000, size.batch)
    log(f"tuning budget: {tune_kimg:.3f} kimg per run ({len(variants())} runs)")
    results: dict[str, dict[str, Any]] = {}
    for name, (objective, edit) in variants().items():
        main_row = name in ("ECT", "iCT")
        results[name] = tune_and_eval(name, objective, edit, init, out, size, tune_kimg, curve=main_row,
                                      steps=(1, 2) if main_row else size.ablation_steps, ref=ref, device=device,
                                      ext=ext, log=log)

    metric = ext.report_name
    rows = [{"method": "diffusion (pretrained), EDM Heun", "nfe": heun["results"][0]["nfe"], "fd": heun["fd"]["heun"],
             "images": f"{pre_kimg:.1f}k (pretraining)", "train_s": pre_seconds, "eval_s": heun["seconds"]}]
    for name, r in results.items():
        for label, fd in r["fd"].items():
            steps = int(label.removesuffix("step"))
            rows.append({"method": f"{name}, {steps} step{'s' if steps > 1 else ''}", "nfe": steps, "fd": fd,
                         "images": f"{r['tune_kimg']:.2f}k", "train_s": r["train_seconds"], "eval_s": r["eval_seconds"]})
    small = size.n < 10_000
    note = (f"n is small (n = {size.n}, reference = {ref.count} images): FD has a large small-sample bias, so compare rows "
            "with each other only, never with published numbers." if small else
            f"Reference statistics over {ref.count} training images.")
    note += (f" Pretraining {pre_kimg:.1f} kimg in {pre_seconds:.0f}s; each tuning run {tune_kimg:.2f} kimg from the same "
             f"pretrained model; batch {size.batch}. Total wall time {time.time() - start:.0f}s.")
    table = markdown_table(rows, metric=metric, hardware=hardware, n=size.n, note=note)
    plot_curves(results, heun["fd"]["heun"], out / "fd_vs_tuning_images.png", metric)
    record = {"size": a.size, "hardware": hardware, "device": str(device), "metric": metric, "n": size.n,
              "reference_images": ref.count, "pretrain": {"kimg": pre_kimg, "seconds": pre_seconds, "img_per_s": rate},
              "heun": heun, "tune_kimg": tune_kimg, "results": results, "rows": rows,
              "size_config": json.loads(json.dumps(dataclasses.asdict(size), default=str)),
              "reference_seconds": ref_seconds, "total_seconds": time.time() - start}
    atomic_write_text(out / "results.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "table.md", table)
    print("\n" + table)
    log(f"done in {time.time() - start:.0f}s; wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'fd_vs_tuning_images.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
