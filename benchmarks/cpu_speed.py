"""CPU training speed of the default job's network, side by side: thread counts, channels_last, torch.compile and
the data path. Prints img/s for each variant and how far its weights after the timed steps are from the default's
(the same seeds and data, so 0 means bit-identical).

    python3 benchmarks/cpu_speed.py                       # fashion-mnist preset, pretrain and tune steps
    python3 benchmarks/cpu_speed.py --steps 20 --json out.jsonl

Each variant starts from the same initial weights and trains `--warmup` + `--steps` steps; img/s is measured over
the timed steps only. The tune variant times the preset's last ECT stage (r > 0 for almost every row: a target
pass on nearly the whole batch). `data` is the share of a step spent gathering and converting the batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ectune.data import load_batch, open_dataset, to_model_input  # noqa: E402
from ectune.model import build_model  # noqa: E402
from ectune.objectives import last_stage_start, loss_spec  # noqa: E402
from ectune.presets import get_preset  # noqa: E402
from ectune.runtime import distributed as rt_dist  # noqa: E402
from ectune.runtime.device import describe_hardware  # noqa: E402
from ectune.training.fastpath import FastPath  # noqa: E402
from ectune.training.step import make_optimizer, training_step  # noqa: E402

VARIANTS = {
    "default": dict(),
    "threads=1": dict(threads=1),
    "threads=cores": dict(threads="cores"),
    "channels_last": dict(channels_last=True),
    "compile": dict(compile=True),
}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_variant(mode: str, name: str, opts: dict, args: argparse.Namespace, data) -> dict:
    cfg = get_preset("fashion-mnist", mode)
    cfg = replace(cfg, runtime=replace(cfg.runtime, device="cpu", compile=bool(opts.get("compile"))))
    default_threads = torch.get_num_threads()
    threads = opts.get("threads", default_threads)
    torch.set_num_threads(usable_cores() if threads == "cores" else threads)
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        if opts.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(cfg, list(model.net.parameters()), torch.device("cpu"))
        fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=torch.device("cpu"))
        spec = loss_spec(cfg.objective, data_dim=math.prod(cfg.net.image_shape), sigma_data=cfg.precond.sigma_data)
        nimg = 0 if mode == "pretrain" else last_stage_start(cfg.objective, total_nimg=cfg.train.total_kimg * 1000)
        model.train()
        B = cfg.train.batch
        for _ in range(args.warmup):
            training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=rt_dist.Dist())
            nimg += B
        start = time.perf_counter()
        for _ in range(args.steps):
            training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=rt_dist.Dist())
            nimg += B
        elapsed = time.perf_counter() - start
        t0 = time.perf_counter()
        for i in range(args.steps):
            images, _ = load_batch(data, torch.arange(i * B, (i + 1) * B) % len(data))
            to_model_input(images, device="cpu", xflip=False, flip_mask=None)
        data_s = time.perf_counter() - t0
        weights = torch.cat([p.detach().flatten() for p in model.net.parameters()])
        return dict(mode=mode, variant=name, threads=torch.get_num_threads(), img_per_s=round(B * args.steps / elapsed, 1),
                    s_per_step=round(elapsed / args.steps, 3), data_share=round(data_s / elapsed, 3), weights=weights)
    finally:
        torch.set_num_threads(default_threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="pretrain,tune")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cfg = get_preset("fashion-mnist", "pretrain")
    data = open_dataset(replace(cfg.data, split="test"))
    print(f"{describe_hardware('cpu')}; {usable_cores()} usable cores; torch default {torch.get_num_threads()} threads")
    print(f"{'mode':9s} {'variant':14s} {'threads':>7s} {'img/s':>7s} {'s/step':>7s} {'data':>5s}  weights vs default")
    for mode in args.modes.split(","):
        base = None
        for name in args.variants.split(","):
            rec = run_variant(mode, name, VARIANTS[name], args, data)
            weights = rec.pop("weights")
            if base is None:
                base = weights
            diff = float((weights - base).abs().max() / base.abs().max())
            rec["weights_max_rel_diff"] = diff
            print(f"{mode:9s} {name:14s} {rec['threads']:7d} {rec['img_per_s']:7.1f} {rec['s_per_step']:7.3f} "
                  f"{rec['data_share']:5.1%}  {'identical' if diff == 0 else f'{diff:.1e}'}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**rec, "hardware": describe_hardware("cpu")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
