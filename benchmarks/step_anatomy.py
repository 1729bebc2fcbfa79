#!/usr/bin/env python
"""Where an eager ECT step's device work goes, counted on any machine (no GPU needed).

    python benchmarks/step_anatomy.py                         # cifar10 preset (DDPM++ 55.7M), bf16, on the CPU
    python benchmarks/step_anatomy.py --precision fp32 --json out.json

It runs the batch-proportional part of one training step of the preset's last ECT stage (target pass, student
pass, loss, backward) at two small batch sizes, and prints per image:

* kernels: aten operations dispatched that are not views (about one CUDA kernel launch each in eager mode);
* traffic: bytes read + written by operations other than convolutions, matmuls and attention, i.e. the
  memory-bound work that an eager GPU step streams through HBM (and that torch.compile fuses away);
* saved: bytes autograd keeps for the backward pass (activation memory: peak ≈ fixed + batch × saved);

then the operations that move the most bytes. The networks cast weights to the activation dtype themselves and
GroupNorm opts out of autocast, so the dtypes seen here are the ones CUDA runs (CPU and CUDA autocast agree on
every other operation these networks use: convolutions, linear layers and attention in bf16, the rest promoted).
These are counts, not timings; `benchmarks/throughput.py` times the step on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Compute-bound operations (tensor cores); everything else is counted as memory traffic.
_COMPUTE = ("convolution", "mm", "addmm", "bmm", "linear", "attention", "_flash_", "_efficient_")


class OpTally(TorchDispatchMode):
    """Counts every non-view aten operation with the bytes it reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [count, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            moved = sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            entry = self.ops[func.overloadpacket.__name__]
            entry[0] += 1
            entry[1] += moved
        return out


def measure(model, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, spec, label_dim: int) -> dict:
    """Kernels, bytes per operation and saved-for-backward bytes of one loss + backward."""
    from ectune.losses import consistency_loss

    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        s = tensor.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()  # a tensor saved by several nodes is held once
        return tensor

    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=g)
    key = torch.randint(0, 2**31 - 1, (x0.shape[0],), generator=g)
    labels = torch.randint(0, label_dim, (x0.shape[0],), generator=g) if label_dim else None  # ImageNet presets
    tally = OpTally()
    with tally:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = consistency_loss(model, x0, t, r, eps, class_labels=labels, dropout_key=key, spec=spec)
        loss.sum().backward()
    model.zero_grad(set_to_none=True)
    return {"ops": dict(tally.ops), "saved": sum(storages.values())}


def per_image(small: dict, large: dict, n_small: int, n_large: int) -> dict:
    """Slope of each quantity between the two batch sizes (the part that grows with the batch)."""
    dn = n_large - n_small
    names = set(small["ops"]) | set(large["ops"])
    ops = {k: [(large["ops"].get(k, [0, 0])[i] - small["ops"].get(k, [0, 0])[i]) / dn for i in (0, 1)] for k in names}
    return {"ops": ops, "saved": (large["saved"] - small["saved"]) / dn}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--batches", default="2,4", help="two batch sizes; the per-image figures are the slope between them")
    p.add_argument("--recompute-norms", action="store_true", help="recompute GroupNorm + SiLU in backward, as "
                   "eager CUDA training does by default (--runtime.recompute-norms auto)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default="", help="also write the figures to this file")
    a = p.parse_args(argv)

    from ectune.objectives import draw_t_r, loss_spec
    from ectune.model import build_model
    from ectune.nets import count_params
    from ectune.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset(a.preset, "tune")
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    model = build_model(cfg, compute_dtype=dtype).train()
    model.net.set_recompute_norms(a.recompute_norms)
    shape = (cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    total = cfg.train.total_kimg * 1000
    spec = loss_spec(cfg.objective, data_dim=math.prod(shape), sigma_data=cfg.precond.sigma_data)
    sizes = [int(b) for b in a.batches.split(",")]
    runs = []
    for n in sizes:
        t, r = draw_t_r(cfg.objective, n=n, nimg=int(total) - n, total_nimg=total, generator=torch.Generator().manual_seed(1))
        r = torch.where(r > 0, r, 0.5 * t)  # every row runs the target pass, as in the last stage
        x0 = torch.rand((n, *shape), generator=torch.Generator().manual_seed(2)) * 2 - 1
        runs.append(measure(model, x0, t, r, spec, cfg.net.label_dim))
    slope = per_image(runs[0], runs[1], sizes[0], sizes[1])

    def is_compute(name: str) -> bool:
        return any(k in name for k in _COMPUTE)

    kernels = sum(c for c, _ in runs[1]["ops"].values())
    traffic = sum(b for k, (_, b) in slope["ops"].items() if not is_compute(k))
    summary = {
        "preset": a.preset, "precision": a.precision, "recompute_norms": a.recompute_norms,
        "params": count_params(model.net), "batch_for_kernels": sizes[1],
        "kernels_per_step": kernels, "traffic_mb_per_img": round(traffic / 2**20, 2),
        "saved_mb_per_img": round(slope["saved"] / 2**20, 2),
        "saved_gib_at_batch_128": round(128 * slope["saved"] / 2**30, 2), "torch": torch.__version__,
    }
    print(json.dumps(summary))
    top = sorted(((b, k, c) for k, (c, b) in slope["ops"].items() if not is_compute(k)), reverse=True)[: a.top]
    if top:
        print(f"\n{'operation (memory-bound)':<40} {'calls':>6} {'MB/img':>9} {'share':>6}")
    for b, k, c in top:
        print(f"{k:<40} {runs[1]['ops'][k][0]:>6} {b / 2**20:>9.2f} {b / traffic:>6.1%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**summary, "per_img_bytes": {k: v[1] for k, v in slope["ops"].items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
