"""ECT tuning in different precisions, at equal images: FD-Lite0 of the same pretrained model tuned to the last stage.

    python benchmarks/precision_tuning.py                        # 2-core CPU: pretrains a micro net, ~25 min in all
    python benchmarks/precision_tuning.py --init runs/fm-dm      # tune your pretrained model instead

Every run tunes the same pretrained weights for the same number of images with CIFAR-10's schedule shape (q = 2,
8 stages: the stages' largest r/t are 1 − 1/2^a = 0.5 … 0.996), once per --train.precision in --precisions and
seed in --seeds (the seed changes the data order, noise and dropout keys); then FD-Lite0 (1 and 2 steps) of each
run's EMA against the training set. "staged" is the CUDA default (`auto`): bf16, then TF32, then fp32 by stage.
A CPU has no TF32, so on a CPU each run trains stage by stage and the stages where the CUDA policy uses TF32 run
under ectune.runtime.precision.emulate_tf32 (conv/matmul inputs rounded to 10 mantissa bits): the CPU computes
what the GPU would. Pretraining and tuning reuse benchmarks/paper_table.py (its `cpu` size: micro DDPM++, batch
64, n = 1000 samples against 5k training images). Writes table.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from paper_table import SIZES, pretrain, tune_and_eval

from ectune.config import RunConfig
from ectune.data import open_dataset
from ectune.evaluation import describe_hardware, load_extractor, reference_for_data
from ectune.objectives import largest_r_over_t, stage_nimg
from ectune.precond import resolve_precision
from ectune.runtime.checkpoint import atomic_write_text, read_model_meta
from ectune.runtime.precision import tf32_mode
from ectune.runtime.device import resolve_device  # noqa: E402
from ectune.training.loop import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="", help="pretrained model (run dir or file); default: pretrain a micro net")
    p.add_argument("--pretrain-seconds", type=float, default=300.0)
    p.add_argument("--precisions", default="fp32,staged,bf16", help="--train.precision values to compare")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--tune-kimg", type=float, default=12.8, help="tuning images per run (thousands)")
    p.add_argument("--q", type=float, default=2.0)
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/precision_tuning"))
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device)
    size = replace(SIZES["cpu"], pretrain_seconds=a.pretrain_seconds)
    if any(a.out.glob("tune-*")):
        raise SystemExit(f"{a.out} holds an earlier comparison; give a new --out (runs would otherwise resume).")
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - start:6.0f}s] {msg}"
        print(line, flush=True)
        with open(a.out / "log.txt", "a") as f:
            f.write(line + "\n")

    hardware = describe_hardware(device)
    log(f"precision_tuning on {hardware}")
    pretrained: dict[str, Any] = {"init": a.init}
    if a.init:
        init = Path(a.init)
    else:
        init, kimg, seconds, rate = pretrain(a.out, size, log)
        pretrained.update(kimg=kimg, seconds=seconds, img_per_s=rate)
    ext = load_extractor("lite0", device=device)
    cfg, _ = read_model_meta(init)
    ref = reference_for_data(open_dataset(replace(cfg.data, split="train")), "train", ext, cache_dir=a.out / "cache",
                             max_images=size.ref_max, batch=size.eval_batch)

    runs = []
    for precision in a.precisions.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            res = tune_and_eval(f"{precision} seed {seed}", "ect", edit(precision, seed, a), init, a.out, size,
                                a.tune_kimg, curve=False, steps=(1, 2), ref=ref, device=device, ext=ext, log=log,
                                trainer=train if device.type == "cuda" else train_emulating_tf32)
            runs.append({"precision": precision, "seed": seed, **res})
    table = markdown(runs, hardware=hardware, n=size.n, ref_count=ref.count, a=a, seconds=time.time() - start)
    record = {"hardware": hardware, "pretrained": pretrained, "runs": runs, "args": {k: str(v) for k, v in vars(a).items()},
              "total_seconds": time.time() - start}
    atomic_write_text(a.out / "results.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(a.out / "table.md", table)
    print("\n" + table)
    return 0


def edit(precision: str, seed: int, a: argparse.Namespace) -> Callable[[RunConfig], RunConfig]:
    """The tuning config of one run: the schedule to the last stage, this precision and seed."""
    def apply(cfg: RunConfig) -> RunConfig:
        return replace(cfg, objective=replace(cfg.objective, q=a.q, stages=a.stages),
                       train=replace(cfg.train, precision=precision, seed=seed))
    return apply


def train_emulating_tf32(cfg: RunConfig, run_dir: Path, *, until_kimg: float, **kwargs: Any) -> None:
    """`train` up to `until_kimg`, one ECT stage at a time, each stage under the TF32 that `cfg.train.precision`
    gives it on CUDA (emulated: the CPU has none; the autocast dtype is applied by `train` itself)."""
    total = cfg.train.total_kimg * 1000
    d = stage_nimg(cfg.objective, total)
    ends = [k * d for k in range(1, math.ceil(total / d))] + [until_kimg * 1000]
    start = 0.0
    for end in sorted(e for e in ends if e <= until_kimg * 1000):
        p = resolve_precision(cfg.train.precision, "cuda", tf32=cfg.runtime.tf32,
                              max_r_over_t=largest_r_over_t(cfg.objective, nimg=int(start), total_nimg=total))
        with tf32_mode(p.tf32, "cpu"):
            train(cfg, run_dir, until_kimg=end / 1000, **kwargs)
        start = end


def markdown(runs: list[dict], *, hardware: str, n: int, ref_count: int, a: argparse.Namespace, seconds: float) -> str:
    """Mean and range over seeds of FD-Lite0 (1 and 2 steps) and the tuning time, one row per precision."""
    lines = ["| --train.precision | FD-Lite0 1 step: mean (range) | 2 steps: mean (range) | tuning s per run | seeds |",
             "|---|---:|---:|---:|---|"]
    for precision in dict.fromkeys(r["precision"] for r in runs):
        rows = [r for r in runs if r["precision"] == precision]
        cells = []
        for key in ("1step", "2step"):
            v = [r["fd"][key] for r in rows]
            cells.append(f"{statistics.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})")
        train_s = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"| {precision} | {cells[0]} | {cells[1]} | {train_s:.0f} | {', '.join(str(r['seed']) for r in rows)} |")
    return ("\n".join(lines) + f"\n\nEach run: {runs[0]['tune_kimg']:.2f}k tuning images from the same pretrained model, "
            f"q = {a.q:g}, {a.stages} stages; FD-Lite0 on n = {n} samples against {ref_count} training images "
            f"(small-sample bias: compare rows only). {hardware}; total {seconds:.0f} s.\n")


if __name__ == "__main__":
    sys.exit(main())
