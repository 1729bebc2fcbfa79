"""Sample-quality evaluation of ectune models: Fréchet distances for 1, 2, ... consistency steps (and the EDM Heun
sampler for diffusion models), a search for the best intermediate time of 2-step sampling, the periodic
evaluation hook of the training loop, and the scaling-law fit of Sec. 4.2.

Protocol (REFERENCE §6): images are generated from per-sample seeds ``seed, seed+1, ..., seed+n-1`` and compared
with the feature statistics of the model's own training data. Because sample i depends only on seed i and the
feature statistics add exactly (``FeatureStats``), splitting the seeds over torch.distributed ranks
(contiguous shares, ``rank_seeds``) and all-reducing the statistics gives the same number as one process.

Numbers are reported under the extractor's ``report_name`` ("FD-Lite0" for the offline default): only the
"inception" extractor gives FID.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .analysis import golden_section_search
from .config import RunConfig
from .data import ImageDataset, open_dataset
from .metrics import (
    FeatureExtractor, FeatureStats, content_fingerprint, default_cache_dir, fd_from_stats, get_extractor,
    precision_recall, ref_key, reference_stats, stats_of_generator,
)
from .model import sample_images
from .runtime import distributed as rt_dist
from .runtime.device import describe_hardware
from .sampling import to_uint8

__all__ = [
    "METRICS",
    "HELDOUT_SEED_OFFSET",
    "describe_hardware",
    "evaluate_in_training",
    "evaluate_model",
    "load_extractor",
    "reference_for_data",
    "search_mid_t",
]

METRICS: tuple[str, ...] = ("lite0", "inception", "dinov2")
# Seeds of the mid-t search start this far above the evaluation seeds, so the time chosen on them is scored on
# images it never saw (no selection bias in the reported 2-step number) for any n below a billion.
HELDOUT_SEED_OFFSET = 1_000_000_000
# Seeds of the periodic in-training evaluation: fixed, so the curve over kimg compares like with like.
TRAINING_EVAL_SEED = 0

_EXTRACTOR_CACHE: dict[tuple[str, str, str], FeatureExtractor] = {}


# ---------------------------------------------------------------------------------------------- helpers
def check_metric(metric: str) -> str:
    """The metric name if it is known; one clear ValueError otherwise (before anything slow happens)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (--metric); expected one of {', '.join(METRICS)}")
    return metric


def load_extractor(metric: str, *, device: torch.device | str = "cpu", weights: str | os.PathLike | None = None) -> FeatureExtractor:
    """The feature extractor of a metric, built once per (metric, device, weights) and then reused.

    Reuse matters for the in-training hook, which would otherwise reload the weights at every evaluation.
    """
    check_metric(metric)
    key = (metric, str(torch.device(device)), "" if weights is None else str(weights))
    if key not in _EXTRACTOR_CACHE:
        _EXTRACTOR_CACHE[key] = get_extractor(metric, device=device, weights=weights)  # type: ignore[arg-type]
    return _EXTRACTOR_CACHE[key]


def reference_for_data(
    data: ImageDataset,
    split: str,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    max_images: int = 0,
    batch: int = 250,
) -> FeatureStats:
    """Cached feature statistics of a dataset (the reference set of every FD in this module).

    The cache key (``ref_key``) names the dataset description, split, extractor and resolution, and carries a
    fingerprint of the images' content (replaced files give new statistics, never stale ones). ``max_images`` > 0
    uses an evenly spaced subset of that many images (for quick checks on a CPU; the key records the subset size).
    Under torch.distributed rank 0 computes and writes the file first, so ranks never race on it.
    """
    if data.is_latent:
        raise ValueError(f"{data.description} holds latents, not images: a latent model's samples are decoded images, "
                         "so its reference is a set of images (`ectune eval --ref IMAGES`; see docs/latents.md)")
    images, desc = data.images, data.description
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0 (0 = all images), got {max_images}")
    if 0 < max_images < len(data):
        idx = torch.linspace(0, len(data) - 1, max_images).round().long()
        images, desc = images.index_select(0, idx), f"{desc} subset{max_images}"
    key = ref_key(desc, split, extractor.name, resolution=data.resolution, fingerprint=content_fingerprint(images))
    rank, world = rt_dist.rank_and_world()
    if rank == 0:
        stats = reference_stats(images, extractor, cache_dir=cache_dir, key=key, batch=batch)
    rt_dist.barrier()
    if rank != 0:
        stats = reference_stats(images, extractor, cache_dir=cache_dir, key=key, batch=batch)
    return stats


def reference_cache_path(stats: FeatureStats, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``reference_for_data`` keeps the statistics with this key."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / f"{stats.key}.npz"


# ---------------------------------------------------------------------------------------------- generation
def _generator_stats(
    model: torch.nn.Module,
    cfg: RunConfig,
    seeds: Tensor,
    *,
    extractor: FeatureExtractor,
    steps: int,
    mid_t: Sequence[float] | None,
    method: str,
    device: torch.device | str,
    batch: int,
    keep_features: int = 0,
) -> tuple[FeatureStats, Tensor | None]:
    """Feature statistics of the images for `seeds` (this rank's contiguous share, `rank_seeds`), summed over ranks.

    With ``keep_features`` > 0 also returns the features of the first ``keep_features`` seeds, gathered from all
    ranks in seed order (for precision/recall), identical to a one-process run.
    """
    rank, world = rt_dist.rank_and_world()
    kept: list[Tensor] = []

    def generate(positions: Tensor) -> Tensor:  # positions in `seeds`, so the kept features can be told apart
        return to_uint8(sample_images(model, cfg, seeds[positions], steps=steps, mid_t=mid_t, method=method,
                                      batch=batch, device=device))

    def keep(positions: Tensor, features: Tensor) -> None:
        kept.append(features[positions < keep_features].cpu())

    stats = stats_of_generator(generate, rt_dist.rank_seeds(torch.arange(len(seeds)), rank, world), extractor,
                               batch=batch, on_features=keep if keep_features > 0 else None)
    if keep_features <= 0:
        return stats, None
    # Contiguous shares concatenated in rank order are the seeds in order.
    return stats, rt_dist.all_gather_cat(torch.cat(kept) if kept else torch.zeros(0, extractor.dim))


@dataclass(frozen=True)
class _Run:
    """One sampler setting to evaluate."""

    method: str  # "consistency" or "heun"
    steps: int  # consistency steps; for heun, the Heun step count
    mid_t: tuple[float, ...]

    @property
    def nfe(self) -> int:
        return self.steps if self.method == "consistency" else 2 * self.steps - 1  # Heun: last step is Euler

    @property
    def label(self) -> str:
        return f"{self.steps}step" if self.method == "consistency" else "heun"


def _runs_for(cfg: RunConfig, *, steps: Sequence[int], mid_t: Sequence[float] | None, heun: bool) -> list[_Run]:
    runs = []
    for s in steps:
        if int(s) < 1:
            raise ValueError(f"--steps must be positive integers, got {list(steps)}")
        mids = tuple(cfg.sample.mid_t if mid_t is None else mid_t)
        if len(mids) < int(s) - 1:
            raise ValueError(f"{s}-step sampling needs {int(s) - 1} intermediate time(s) (--mid-t), got {list(mids)}")
        runs.append(_Run("consistency", int(s), tuple(float(t) for t in mids[: int(s) - 1])))
    if heun:
        runs.append(_Run("heun", cfg.sample.heun_steps, ()))
    if not runs:
        raise ValueError("nothing to evaluate: give at least one step count (--steps) or enable Heun sampling")
    return runs


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    cfg: RunConfig,
    *,
    ref_stats: FeatureStats,
    metric: str = "lite0",
    steps: Sequence[int] = (1, 2),
    n: int = 10_000,
    seed: int = 0,
    mid_t: Sequence[float] | None = None,
    heun: bool | None = None,
    device: torch.device | str = "cpu",
    batch: int = 250,
    extractor: FeatureExtractor | None = None,
    weights: str | os.PathLike | None = None,
    pr_real: Tensor | None = None,
    pr_n: int = 0,
    pr_k: int = 3,
) -> dict[str, Any]:
    """Fréchet distance of the model's samples against `ref_stats` for each sampler setting.

    Args:
        model: f_θ (a Precond) in eval mode, on `device`.
        cfg: the model's config (image shape, sampler defaults: t_max, mid_t, heun_steps).
        ref_stats: feature statistics of the reference data (``reference_for_data``), same extractor.
        metric: extractor name ("lite0", "inception", "dinov2"); ignored when `extractor` is given.
        steps: consistency step counts to evaluate, e.g. (1, 2).
        n: number of samples per setting; sample i uses seed `seed + i` (same seeds for every setting).
        mid_t: intermediate times for 2+ steps; default cfg.sample.mid_t.
        heun: also evaluate the EDM Heun sampler at cfg.sample.heun_steps (2·steps − 1 NFE); default: only for
            diffusion models (cfg.objective.kind == "diffusion").
        batch: samples per generator/extractor call (does not change the result).
        pr_real: uint8 real images [M, C, H, W]; when given, k-NN precision/recall of the first `pr_n` (default
            min(n, M)) samples against them are added.

    Returns:
        {"metric", "metric_name", "extractor", "n", "seed", "seeds": [first, last], "results": [{"method", "steps",
        "nfe", "mid_t", "fd", ("precision", "recall")}, ...], "fd": {label: fd}, "seconds"}.
        Labels are "1step", "2step", ..., "heun".
    """
    if n < 2:
        raise ValueError(f"--n must be at least 2 (a covariance needs two samples), got {n}")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    ext = extractor if extractor is not None else load_extractor(metric, device=device, weights=weights)
    if ref_stats.extractor and ref_stats.extractor != ext.name:
        raise ValueError(f"reference statistics come from extractor {ref_stats.extractor!r}, not {ext.name!r}")
    heun = cfg.objective.kind == "diffusion" if heun is None else heun
    runs = _runs_for(cfg, steps=steps, mid_t=mid_t, heun=heun)
    seeds = torch.arange(seed, seed + n, dtype=torch.int64)
    real_feats = None
    keep = 0
    if pr_real is not None:
        keep = min(n, pr_n or n, len(pr_real))
        real_feats = torch.cat([ext(pr_real[i : i + batch]).cpu() for i in range(0, keep, batch)])
    t0 = time.time()
    results = []
    for run in runs:
        stats, fake_feats = _generator_stats(model, cfg, seeds, extractor=ext, steps=run.steps, mid_t=run.mid_t or None,
                                             method=run.method, device=device, batch=batch, keep_features=keep)
        row: dict[str, Any] = {"method": run.method, "label": run.label, "steps": run.steps, "nfe": run.nfe,
                               "mid_t": list(run.mid_t), "fd": fd_from_stats(stats, ref_stats)}
        if real_feats is not None and fake_feats is not None:
            row["precision"], row["recall"] = precision_recall(real_feats, fake_feats, k=pr_k)
            row["pr_n"], row["pr_k"] = keep, pr_k
        results.append(row)
    return {
        "metric": ext.name, "metric_name": ext.report_name, "extractor": ext.name, "n": n, "seed": seed,
        "seeds": [seed, seed + n - 1], "results": results, "fd": {r["label"]: r["fd"] for r in results},
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------------------------------------- mid-t search
@torch.no_grad()
def search_mid_t(
    model: torch.nn.Module,
    cfg: RunConfig,
    *,
    ref_stats: FeatureStats,
    extractor: FeatureExtractor,
    n: int = 2000,
    seed: int = HELDOUT_SEED_OFFSET,
    lo: float = 0.1,
    hi: float = 10.0,
    iters: int = 8,
    device: torch.device | str = "cpu",
    batch: int = 250,
) -> tuple[float, list[dict[str, float]]]:
    """The intermediate time τ of 2-step sampling that minimises the FD, by golden-section search on log τ.

    Scored on seeds ``seed .. seed+n-1``, which should be held out from the evaluation seeds (the default starts at
    HELDOUT_SEED_OFFSET) so the reported 2-step FD is not biased by the selection. Returns (best τ, history of
    {"mid_t", "fd"} in evaluation order).
    """
    if not 0 < lo < hi < cfg.sample.t_max:
        raise ValueError(f"--search-range must satisfy 0 < lo < hi < t_max = {cfg.sample.t_max}, got lo={lo}, hi={hi}")
    seeds = torch.arange(seed, seed + n, dtype=torch.int64)

    def fd_at(tau: float) -> float:
        stats, _ = _generator_stats(model, cfg, seeds, extractor=extractor, steps=2, mid_t=(tau,), method="consistency",
                                    device=device, batch=batch)
        return fd_from_stats(stats, ref_stats)

    best, hist = golden_section_search(fd_at, lo, hi, iters=iters, log=True)
    return best, [{"mid_t": h["x"], "fd": h["value"]} for h in hist]


# ---------------------------------------------------------------------------------------------- training hook
def evaluate_in_training(
    ema_model: torch.nn.Module,
    cfg: RunConfig,
    data: ImageDataset,
    *,
    nimg: int,
    device: torch.device | str,
) -> dict[str, Any]:
    """The training loop's periodic evaluation (every cfg.runtime.eval_kimg): FD of the EMA model, on every rank.

    Uses cfg.runtime.eval_metric and cfg.runtime.eval_n samples with the fixed seeds 0..eval_n-1, against the cached
    statistics of the training data. Consistency models report the 1-step FD as `metric_value` (2-step alongside);
    diffusion models report the Heun FD. Returns a JSON-able record with 'kimg', 'metric_name', 'metric_value'.
    """
    ext = load_extractor(cfg.runtime.eval_metric, device=device)
    ref = reference_for_data(data, cfg.data.split, ext)
    diffusion = cfg.objective.kind == "diffusion"
    was_training = ema_model.training
    ema_model.eval()
    try:
        res = evaluate_model(ema_model, cfg, ref_stats=ref, extractor=ext, steps=() if diffusion else (1, 2),
                             n=cfg.runtime.eval_n, seed=TRAINING_EVAL_SEED, heun=diffusion, device=device)
    finally:
        ema_model.train(was_training)
    primary = "heun" if diffusion else "1step"
    record: dict[str, Any] = {"kimg": nimg / 1000, "metric_name": res["metric_name"], "metric_value": res["fd"][primary],
                              "metric_sampler": primary, "eval_n": res["n"], "eval_seconds": round(res["seconds"], 2)}
    record.update({f"fd_{label}": value for label, value in res["fd"].items()})
    return record


# ---------------------------------------------------------------------------------------------- scaling law


def open_reference_data(cfg: RunConfig, ref: str | os.PathLike | None = None) -> ImageDataset:
    """The reference set of `ectune eval`: the EDM-layout images at `ref` if given (required for latent models, whose
    samples are decoded images), else the model's own training data (cfg.data, train split)."""
    from dataclasses import replace

    if ref is not None:
        from .data import load_edm_dataset

        return load_edm_dataset(ref, use_labels=False)
    if cfg.data.vae:
        raise ValueError("a latent model is evaluated on decoded images against reference images: pass --ref with a "
                         "folder or .zip of images at the decoded resolution (e.g. `ectune convert-images IMAGES "
                         "ref.zip --resolution 512`)")
    return open_dataset(replace(cfg.data, split="train"))
