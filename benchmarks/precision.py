#!/usr/bin/env python
"""How much of ECT's training signal each precision mode keeps, over a sweep of r/t.

    python benchmarks/precision.py --model runs/fm-ecm                   # a trained model (run dir or model file)
    python benchmarks/precision.py --preset cifar10 --device cuda --n 32  # the preset's network, random init
    python benchmarks/precision.py --model runs/fm-ecm --json            # one JSON object per (mode, r/t)

For each r/t the same rows (data, noise ε, t ~ the preset's LogNormal, r = (r/t)·t, dropout keys) go through f_θ
in every mode, and two numbers are compared with fp32 (TF32 off):

  noise_ratio   median over rows of ‖Δ_mode − Δ_fp32‖ / ‖Δ_fp32‖, Δ = f(x_t, t) − f(x_r, r)  (p90 too)
  grad_cosine   cosine between the parameter gradients of the training loss (the preset's weighting and
                adaptive weighting) in the mode and in fp32

Modes: fp32 (the reference) · tf32 (CUDA's own TF32 on a GPU; on the CPU every fp32 convolution, product and
attention input, forward and backward, rounded to 10 mantissa bits, nearest-even: ectune.runtime.precision) ·
tf32-trunc (that emulation with truncation, on either device: a bound for hardware that truncates) · bf16, fp16
(autocast inside f_θ, as --train.precision runs them; CPU autocast on a CPU) · bf16-head32 (bf16 with the DDPM++
output head, its last GroupNorm and convolution, in fp32; the skip path c_skip·x is fp32 in every mode) ·
fp16-scaled (fp16 with a loss scale: from 2^8, halved until the gradient is finite, as GradScaler backs off).
`default` marks the mode `--train.precision auto` uses on the measuring device at that r/t, `auto_on_cuda` the one
it uses on a GPU (the policy: ectune.precond.resolve_precision).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from throughput import bench_data

from ectune.config import RunConfig
from ectune.data import to_model_input
from ectune.evaluation import describe_hardware
from ectune.objectives import LossSpec, largest_r_over_t, loss_spec, stage_nimg
from ectune.model import build_model, load_model
from ectune.nets import SMALL_CONFIGS
from ectune.precond import Precision, Precond, replace_precond, resolve_precision
from ectune.presets import PRESETS, get_preset
from ectune.runtime.precision import (
    cosine, cuda_tf32, delta, delta_noise_ratio, loss_gradient, tf32_mode,
)
from ectune.schedules import lognormal_t

# The points and the largest r/t of the preset stages (1 − 1/q^a) near the policy's limits.
RATIOS = (0.5, 0.7, 0.75, 0.9, 0.9375, 0.96875, 0.98, 0.984375, 0.99, 0.99609375, 0.999)


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: torch.dtype
    tf32: str = "off"  # off | native (CUDA's own TF32; emulated on a CPU) | truncate (emulated, truncating)
    fp32_head: bool = False
    loss_scale: bool = False

    def runs_as(self, p: Precision) -> bool:
        """Whether this mode is how ectune trains in precision `p` (the TF32 bound and the variants are not)."""
        return (self.dtype == p.dtype and self.tf32 == ("native" if p.tf32 else "off") and not self.fp32_head
                and not self.loss_scale)


MODES = {m.name: m for m in (
    Mode("fp32", torch.float32),
    Mode("tf32", torch.float32, tf32="native"),
    Mode("tf32-trunc", torch.float32, tf32="truncate"),
    Mode("bf16", torch.bfloat16),
    Mode("bf16-head32", torch.bfloat16, fp32_head=True),
    Mode("fp16", torch.float16),
    Mode("fp16-scaled", torch.float16, loss_scale=True),
)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="trained model: run directory or .safetensors (default: random init)")
    p.add_argument("--preset", default="fashion-mnist", choices=tuple(PRESETS),
                   help="tuning recipe: t distribution, loss weighting, stages (and the network without --model)")
    p.add_argument("--net", default="", choices=("", *SMALL_CONFIGS), help="without --model: a small network instead")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="r/t values")
    p.add_argument("--n", type=int, default=64, help="rows (images) per r/t")
    p.add_argument("--data", choices=["real", "random"], default="real", help="Fashion-MNIST images or random ones")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per (mode, r/t) instead of tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("precision.py: --device cuda but no CUDA device is available; nothing measured (use --device cpu)")
        return 0
    device = torch.device(a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"precision.py: unknown mode(s) {unknown}; expected some of {', '.join(MODES)}", file=sys.stderr)
        return 2
    ratios = [float(x) for x in a.ratios.split(",") if x]

    recipe = get_preset(a.preset, "tune")
    f, cfg = load_f(a, recipe, device)
    x0, t, eps, dropout_keys, labels = draw_rows(a, cfg, recipe, device)
    per_row = dict(dropout_key=dropout_keys, class_labels=labels)  # the same in every pass
    spec = loss_spec(recipe.objective, data_dim=x0[0].numel(), sigma_data=cfg.precond.sigma_data)
    common = dict(device=describe_hardware(device), model=a.model or f"{a.preset} {a.net or 'preset'} net, random init",
                  preset=a.preset, n=a.n)

    t0 = time.perf_counter()
    records = []
    for ratio in ratios:
        r = ratio * t
        with cuda_tf32(False):
            ref_delta = delta(f, x0, t, r, eps, **per_row)
            ref_grad = loss_gradient(f, x0, t, r, eps, **per_row, spec=spec)
        default = resolve_precision("auto", device, tf32=False, max_r_over_t=ratio)
        on_cuda = resolve_precision("auto", "cuda", tf32=False, max_r_over_t=ratio)
        noise: dict[Mode, Tensor] = {}  # per forward precision: loss scaling changes only the gradient
        for name in modes:
            mode = MODES[name]
            t1 = time.perf_counter()
            rec = measure(mode, f, x0, t, r, eps, per_row, spec, ref_delta, ref_grad, device, noise)
            if rec is None:
                continue
            rec["seconds"] = round(time.perf_counter() - t1, 1)
            records.append(dict(mode=name, r_over_t=ratio, **rec, default=mode.runs_as(default),
                                auto_on_cuda=mode.runs_as(on_cuda), **common))
            if a.json:
                print(json.dumps(records[-1]), flush=True)
    if not a.json:
        print_tables(records, ratios, modes, recipe, a, common, time.perf_counter() - t0)
    return 0


def load_f(a: argparse.Namespace, recipe: RunConfig, device: torch.device) -> tuple[Precond, RunConfig]:
    """f_θ in training mode (dropout on, keyed), fp32, from --model or the preset's (or --net's) random init."""
    if a.model:
        f, cfg, _ = load_model(a.model, device=device)
    else:
        net = replace(SMALL_CONFIGS[a.net], dropout=recipe.net.dropout) if a.net else recipe.net
        cfg = replace(recipe, net=net)
        torch.manual_seed(a.seed)
        f = build_model(cfg).to(device)
    return f.train(), cfg


def draw_rows(a: argparse.Namespace, cfg: RunConfig, recipe: RunConfig,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(x0, t, ε, dropout keys, class labels or None) for --n rows: data images (and their labels for a
    class-conditional model), t ~ the recipe's LogNormal(P_mean, P_std)."""
    g = torch.Generator().manual_seed(a.seed)
    data = bench_data(a, cfg)
    rows = torch.randperm(len(data.images), generator=g)[: a.n]
    x0 = to_model_input(data.images[rows], device=device)
    labels = None if data.labels is None else data.labels[rows].to(device)
    t = lognormal_t(torch.randn(a.n, generator=g, dtype=torch.float64), P_mean=recipe.objective.P_mean,
                    P_std=recipe.objective.P_std).float().to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    return x0, t, eps, torch.arange(a.n, device=device), labels


def measure(mode: Mode, f: Precond, x0: Tensor, t: Tensor, r: Tensor, eps: Tensor,
            per_row: dict[str, Tensor | None], spec: LossSpec, ref_delta: Tensor, ref_grad: Tensor, device: torch.device,
            noise: dict[Mode, Tensor]) -> dict | None:
    """The mode's noise ratio (median, p90) and gradient cosine against the fp32 reference; None if n/a here.
    `noise` caches the per-row noise ratios of each forward precision across calls."""
    f_mode = with_fp32_head(f) if mode.fp32_head else f
    if f_mode is None:
        return None
    f_mode = replace_precond(f_mode, compute_dtype=mode.dtype)
    forward = replace(mode, loss_scale=False)
    with tf32_mode(mode.tf32 != "off", device, truncate=mode.tf32 == "truncate"):
        if forward not in noise:
            noise[forward] = delta_noise_ratio(delta(f_mode, x0, t, r, eps, **per_row), ref_delta)
        ratios = noise[forward]
        scale = 2.0**8 if mode.loss_scale else 1.0
        grad = loss_gradient(f_mode, x0, t, r, eps, **per_row, spec=spec, loss_scale=scale)
        while mode.loss_scale and not torch.isfinite(grad).all() and scale > 1:
            scale /= 2  # GradScaler's back-off: a scale that overflows is halved
            grad = loss_gradient(f_mode, x0, t, r, eps, **per_row, spec=spec, loss_scale=scale)
    q = ratios.double().quantile(torch.tensor([0.5, 0.9], dtype=torch.float64, device=ratios.device)).tolist()
    rec = dict(noise_ratio=_sig(q[0]), noise_ratio_p90=_sig(q[1]), grad_cosine=round(cosine(grad, ref_grad), 6),
               grad_finite=bool(torch.isfinite(grad).all()))
    if mode.loss_scale:
        rec["loss_scale"] = scale
    return rec


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


class FP32(nn.Module):
    """Runs `inner` outside autocast on fp32 input (the output head of bf16-head32)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


def with_fp32_head(f: Precond) -> Precond | None:
    """A copy of f whose DDPM++ output head (last GroupNorm + convolution) runs in fp32; None for other networks."""
    net = f.net
    names = getattr(net, "_out_norm", None), getattr(net, "_out_conv", None)
    if None in names:
        return None
    net = copy.deepcopy(net)
    for name in names:
        net.dec[name] = FP32(net.dec[name])
    return replace_precond(f, net=net)


def print_tables(records: list[dict], ratios: list[float], modes: list[str], recipe: RunConfig,
                 a: argparse.Namespace, common: dict, seconds: float) -> None:
    """Noise ratio and gradient cosine, modes × r/t; * = the default on this device, † = auto's choice on CUDA."""
    by = {(rec["mode"], rec["r_over_t"]): rec for rec in records}
    print(f"{common['model']}; {a.n} rows, t ~ LogNormal({recipe.objective.P_mean}, {recipe.objective.P_std}) "
          f"({a.preset} recipe); {common['device']}; {seconds:.0f} s")
    head = "| mode | " + " | ".join(f"r/t {x:g}" for x in ratios) + " |"
    rule = "|---|" + "---:|" * len(ratios)
    for title, key, fmt in (("Δ-noise ratio (median over rows)", "noise_ratio", "{:.3g}"),
                            ("gradient cosine to fp32", "grad_cosine", "{:.5f}")):
        print(f"\n{title}\n{head}\n{rule}")
        for m in modes:
            cells = []
            for x in ratios:
                rec = by.get((m, x))
                mark = "" if rec is None else "*" * rec["default"] + "†" * rec["auto_on_cuda"]
                cells.append("n/a" if rec is None else fmt.format(rec[key]) + mark)
            print(f"| {m} | " + " | ".join(cells) + " |")
    total = recipe.train.total_kimg * 1000
    d = stage_nimg(recipe.objective, total)
    stages = [largest_r_over_t(recipe.objective, nimg=int(i * d), total_nimg=total) for i in range(math.ceil(total / d))]
    print(f"\n* = --train.precision auto on this device, † = auto on CUDA. {a.preset} stages' largest r/t: "
          + ", ".join(f"{x:.4g}" for x in stages))


if __name__ == "__main__":
    sys.exit(main())
