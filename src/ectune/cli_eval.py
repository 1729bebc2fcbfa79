"""`ectune eval` (FD of a model's 1/2-step samples, optional mid-t search) and `ectune ref-stats` (cache the
reference statistics of a dataset). See docs/evaluation.md for the options and the result format."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .evaluation import (
    HELDOUT_SEED_OFFSET, METRICS, check_metric, describe_hardware, evaluate_model, load_extractor,
    open_reference_data, reference_cache_path, reference_for_data, search_mid_t,
)


def _parse_steps(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2); '' -> () (e.g. Heun only for a diffusion model)."""
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected comma-separated positive integers such as 1,2") from None
    if any(s < 1 for s in steps):
        raise ValueError(f"--steps {text!r}: step counts must be >= 1")
    return steps


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ectune eval", description="Fréchet distance of a model's samples against its training data")
    p.add_argument("model", type=Path, help="model .safetensors file or run directory")
    p.add_argument("--metric", default="lite0", help=f"feature extractor: {', '.join(METRICS)} (lite0 = FD-Lite0, offline)")
    p.add_argument("--steps", default=None,
                   help="comma-separated consistency step counts (default 1,2; for diffusion models: none, Heun only)")
    p.add_argument("--heun", action="store_true", help="also evaluate the EDM Heun sampler (default for diffusion models)")
    p.add_argument("--n", type=int, default=10_000, help="samples per setting (seeds SEED .. SEED+n-1)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--mid-t", type=float, nargs="+", default=None, help="intermediate time(s) for 2+ steps (default: the model's)")
    p.add_argument("--sigma-min-shift", type=float, default=None,
                   help="boundary f(x, σ_min) = x of consistency sampling (default: the model's sample.sigma_min_shift)")
    p.add_argument("--search-mid-t", action="store_true",
                   help="search the best 2-step intermediate time on held-out seeds and store it in the model file")
    p.add_argument("--search-n", type=int, default=2000, help="samples per FD evaluation of the search")
    p.add_argument("--search-iters", type=int, default=8, help="golden-section iterations (iters + 2 FD evaluations)")
    p.add_argument("--search-range", type=float, nargs=2, default=(0.1, 10.0), metavar=("LO", "HI"),
                   help="search interval for the intermediate time")
    p.add_argument("--pr", action="store_true", help="add k-NN precision/recall (k=3) against training images")
    p.add_argument("--pr-n", type=int, default=10_000, help="samples and real images used for precision/recall")
    p.add_argument("--ref-max", type=int, default=0, help="use an evenly spaced subset of this many training images (0 = all)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: eval-METRIC.json next to the model)")
    p.add_argument("--weights", type=Path, default=None, help="feature-extractor weights file (default: packaged/cached)")
    p.add_argument("--cache-dir", type=Path, default=None, help="reference-statistics cache (default $ECTUNE_CACHE or ~/.cache/ectune)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    return p


def cmd_eval(command: str, rest: Sequence[str]) -> int:
    a = _eval_parser().parse_args(list(rest))
    from .cli import with_sampling_boundary
    from .model import load_model, sampling_boundary
    from .runtime.checkpoint import atomic_write_text, load_model_weights, save_model
    from .training.loop import resolve_device

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
    model_file = a.model / "model.safetensors" if a.model.is_dir() else a.model
    device = resolve_device(a.device)
    t0 = time.time()
    model, cfg, extra = load_model(a.model, device=device)
    cfg = with_sampling_boundary(cfg, a.sigma_min_shift)  # a --search-mid-t stores it with the time it chose
    diffusion = cfg.objective.kind == "diffusion"
    steps = _parse_steps(a.steps) if a.steps is not None else (() if diffusion else (1, 2))
    ext = load_extractor(a.metric, device=device, weights=a.weights)
    data = open_reference_data(cfg)
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
    out = a.out if a.out is not None else model_file.parent / f"eval-{a.metric}.json"
    text = json.dumps(result, indent=2)
    atomic_write_text(out, text + "\n")
    print(text)
    print(f"wrote {out}")
    return 0


def _ref_stats_parser() -> argparse.ArgumentParser:
    from .presets import preset_names

    p = argparse.ArgumentParser(prog="ectune ref-stats", add_help=False,
                                description="compute and cache the reference feature statistics of a dataset; "
                                            "data fields follow as --data.FIELD VALUE (e.g. --data.source idx --data.path DIR)")
    p.add_argument("--preset", default=None, help=f"take the data settings of a preset: {', '.join(preset_names())}")
    p.add_argument("--metric", default="lite0", help=f"feature extractor: {', '.join(METRICS)}")
    p.add_argument("--weights", type=Path, default=None, help="feature-extractor weights file")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default $ECTUNE_CACHE or ~/.cache/ectune)")
    p.add_argument("--max-images", type=int, default=0, help="evenly spaced subset of this many images (0 = all)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("-h", "--help", action="store_true")
    return p


def cmd_ref_stats(command: str, rest: Sequence[str]) -> int:
    import tyro

    from .config import RunConfig, check_all, checks_deferred
    from .data import open_dataset
    from .presets import get_preset
    from .training.loop import resolve_device

    parser = _ref_stats_parser()
    a, overrides = parser.parse_known_args(list(rest))
    if a.help:
        parser.print_help()
        return 0
    check_metric(a.metric)
    stray = [o for o in overrides if o.startswith("-") and not o.startswith("--data.")]
    if stray:
        raise ValueError(f"ectune ref-stats: unknown option(s) {' '.join(stray)}; only --data.FIELD options configure the data")
    base = get_preset(a.preset, "pretrain") if a.preset else RunConfig()
    with checks_deferred():
        cfg = tyro.cli(RunConfig, default=base, args=list(overrides), prog="ectune ref-stats") if overrides else base
    check_all(cfg)
    device = resolve_device(a.device)
    data = open_dataset(cfg.data)
    ext = load_extractor(a.metric, device=device, weights=a.weights)
    t0 = time.time()
    stats = reference_for_data(data, cfg.data.split, ext, cache_dir=a.cache_dir, max_images=a.max_images, batch=a.batch)
    print(f"{ext.report_name} reference statistics of {data.description} ({cfg.data.split}, {stats.count} images, "
          f"{time.time() - t0:.1f}s)")
    print(reference_cache_path(stats, a.cache_dir))
    return 0
