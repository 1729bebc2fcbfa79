"""`ectune eval`: Fréchet distance of a model's 1/2-step (or Heun) samples against its training data, optionally
searching the best 2-step intermediate time. See docs/evaluation.md for the options and the result format."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Sequence

import torch
import tyro

from ..evaluation import (
    HELDOUT_SEED_OFFSET, METRICS, check_metric, describe_hardware, evaluate_model, load_extractor,
    open_reference_data, reference_cache_path, reference_for_data, search_mid_t,
)
from .common import Flag, check_mid_t, optional, parse, with_sampling_boundary

MetricName = Annotated[str, tyro.conf.arg(help=f"feature extractor: {', '.join(METRICS)} (lite0 = FD-Lite0, offline)")]
# Shared with `ectune ref-stats`.
CacheDir = Annotated[Path | None, optional("DIR", unset="$ECTUNE_CACHE or ~/.cache/ectune")]
WeightsFile = Annotated[Path | None, optional("FILE", unset="packaged/cached")]


@dataclass(frozen=True, kw_only=True)
class EvalArgs:
    """Fréchet distance of a model's samples against its training data"""

    model: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """model .safetensors file or run directory"""
    metric: MetricName = "lite0"
    steps: Annotated[str | None, optional("N,N", unset="1,2; for diffusion models: none, Heun only")] = None
    """comma-separated consistency step counts"""
    heun: Flag = False
    """also evaluate the EDM Heun sampler (default for diffusion models)"""
    n: int = 10_000
    """samples per setting (seeds SEED .. SEED+n-1)"""
    seed: int = 0
    """first seed"""
    mid_t: Annotated[tuple[float, ...] | None, optional("T [T ...]", unset="the model's")] = None
    """intermediate time(s) for 2+ steps"""
    sigma_min_shift: Annotated[float | None, optional("S", unset="the model's sample.sigma_min_shift")] = None
    """boundary f(x, σ_min) = x of consistency sampling"""
    search_mid_t: Flag = False
    """search the best 2-step intermediate time on held-out seeds and store it in the model file"""
    search_n: int = 2000
    """samples per FD evaluation of the search"""
    search_iters: int = 8
    """golden-section iterations (iters + 2 FD evaluations)"""
    search_range: Annotated[tuple[float, float], tyro.conf.arg(metavar="LO HI")] = (0.1, 10.0)
    """search interval for the intermediate time"""
    pr: Flag = False
    """add k-NN precision/recall (k=3) against training images"""
    pr_n: int = 10_000
    """samples and real images used for precision/recall"""
    ref: Annotated[Path | None, optional("IMAGES", unset="the model's training data")] = None
    """reference images (EDM folder or .zip); required for latent models, whose samples are decoded"""
    ref_max: int = 0
    """use an evenly spaced subset of this many training images (0 = all)"""
    out: Annotated[Path | None, optional("FILE", unset="eval-METRIC.json next to the model")] = None
    """result JSON"""
    weights: WeightsFile = None
    """feature-extractor weights file"""
    cache_dir: CacheDir = None
    """reference-statistics cache"""
    batch: int = 250
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:1, ..."""


def parse_steps(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2); '' -> () (e.g. Heun only for a diffusion model)."""
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected comma-separated positive integers such as 1,2") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--steps {text!r}: step counts must be >= 1")
    return steps


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(EvalArgs, command, argv)
    from ..model import load_model, sampling_boundary
    from ..runtime.checkpoint import atomic_write_text, load_model_weights, save_model
    from ..runtime.device import resolve_device

    # Cheap checks first: a typo should not cost a model load or a reference pass.
    check_metric(a.metric)
    if a.weights is not None and not a.weights.is_file():
        raise ValueError(f"--weights {a.weights}: no such file (expected the {a.metric} extractor's weights)")
    # A covariance needs two samples; a batch needs one.
    for flag, value, least in (("--n", a.n, 2), ("--search-n", a.search_n, 2), ("--batch", a.batch, 1)):
        if value < least:
            raise ValueError(f"{flag} {value} is too small; expected at least {least}")
    if a.search_mid_t and a.mid_t is not None:
        raise ValueError("--search-mid-t and --mid-t conflict: the search chooses the intermediate time")
    from ..hub.refs import is_hub_ref, resolve_model_path

    on_hub = is_hub_ref(a.model)
    if on_hub and a.search_mid_t:
        raise ValueError(f"--search-mid-t stores its choice in the model file, and {a.model} is in the Hugging Face cache: "
                         "export it to a folder first (`ectune export MODEL DIR`) and search there")
    local = resolve_model_path(a.model)
    model_file = local / "model.safetensors" if local.is_dir() else local
    device = resolve_device(a.device)
    t0 = time.time()
    model, cfg, extra = load_model(local, device=device)
    cfg = with_sampling_boundary(cfg, a.sigma_min_shift)  # a --search-mid-t stores it with the time it chose
    check_mid_t(a.mid_t, cfg)
    diffusion = cfg.objective.kind == "diffusion"
    steps = parse_steps(a.steps) if a.steps is not None else (() if diffusion else (1, 2))
    ext = load_extractor(a.metric, device=device, weights=a.weights)
    data = open_reference_data(cfg, a.ref)
    ref = reference_for_data(data, "train", ext, cache_dir=a.cache_dir, max_images=a.ref_max, batch=a.batch)

    search: dict[str, Any] | None = None
    mid_t = a.mid_t if a.mid_t is not None else extra.get("mid_t")
    if a.search_mid_t:
        lo, hi = a.search_range
        best, history = search_mid_t(model, cfg, ref_stats=ref, extractor=ext, n=a.search_n, seed=a.seed + HELDOUT_SEED_OFFSET,
                                     lo=lo, hi=hi, iters=a.search_iters, device=device, batch=a.batch)
        search = {"best_mid_t": best, "n": a.search_n, "seeds": [a.seed + HELDOUT_SEED_OFFSET, a.seed + HELDOUT_SEED_OFFSET + a.search_n - 1],
                  "range": [lo, hi], "iters": a.search_iters, "metric_name": ext.report_name, "history": history}
        # Store the choice as the model's sampler default (same weights, atomic rewrite), so `ectune sample` uses it.
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, mid_t=(best,) + tuple(cfg.sample.mid_t[1:])))
        new_extra = {**extra, "mid_t_search": search}
        if "mid_t" in new_extra:  # an explicit sampler override in extra would otherwise shadow the new default
            new_extra["mid_t"] = [best] + list(new_extra["mid_t"])[1:]
        save_model(model_file, load_model_weights(model_file), cfg, extra=new_extra)
        mid_t = None

    pr_real = None
    if a.pr:
        idx = torch.linspace(0, len(data) - 1, min(a.pr_n, len(data))).round().long()
        pr_real = data.images.index_select(0, idx)
    res = evaluate_model(model, cfg, ref_stats=ref, extractor=ext, steps=steps, n=a.n, seed=a.seed, mid_t=mid_t,
                         heun=True if a.heun else None, device=device, batch=a.batch, pr_real=pr_real, pr_n=a.pr_n)
    nimg = extra.get("nimg")
    result = {
        "model": str(model_file), "objective": cfg.objective.kind, "nimg": nimg,
        "kimg": None if nimg is None else nimg / 1000,
        **{k: res[k] for k in ("metric", "metric_name", "extractor", "n", "seed", "seeds")},
        "steps": list(steps), "mid_t": list(cfg.sample.mid_t if mid_t is None else mid_t),
        "sigma_min_shift": sampling_boundary(cfg),
        "results": res["results"], "fd": res["fd"],
        "reference": {"data": data.description, "split": "train", "count": ref.count, "key": ref.key,
                      "cache": str(reference_cache_path(ref, a.cache_dir))},
        "mid_t_search": search, "wall_seconds": round(time.time() - t0, 2), "device": str(device),
        "hardware": describe_hardware(device),
    }
    # Results of a Hub model go to the current directory, never into the hub cache.
    out = a.out if a.out is not None else (Path(".") if on_hub else model_file.parent) / f"eval-{a.metric}.json"
    text = json.dumps(result, indent=2)
    atomic_write_text(out, text + "\n")
    print(text)
    print(f"wrote {out}")
    return 0
