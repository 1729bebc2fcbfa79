"""Feature statistics of a generator, and the Fréchet distance between two sets of statistics.

Generation is driven by per-sample seeds: ``generate(seeds)`` must make image i from ``seeds[i]`` alone, so
the evaluated set is the same whatever the batch size or the number of ranks (DESIGN habit 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .extractors import FeatureExtractor
from .fd import FeatureStats, frechet_distance

__all__ = ["fd_from_stats", "stats_of_generator"]


def stats_of_generator(
    generate: Callable[[Tensor], Tensor],
    seeds: Tensor,
    extractor: FeatureExtractor,
    *,
    batch: int,
    all_reduce: bool = True,
    on_features: Callable[[Tensor, Tensor], None] | None = None,
) -> FeatureStats:
    """Feature statistics of the images a generator makes for the given seeds.

    Args:
        generate: maps int64 seeds [B] to uint8 images [B, C, H, W] (C = 1 or 3), one image per seed.
        seeds: int64 [N], the seeds this process evaluates. Under torch.distributed, give each rank a disjoint
            share (e.g. ``ectune.runtime.distributed.rank_seeds(all_seeds, rank, world)``).
        extractor: feature extractor.
        batch: seeds per ``generate`` call.
        all_reduce: sum the statistics over ranks at the end (no-op when torch.distributed is not
            initialised), so every rank returns the statistics of all seeds.
        on_features: called with (seeds [B], features [B, D]) of every batch, for callers that also need
            features (e.g. precision/recall).

    Returns:
        FeatureStats over the N images (over all ranks' images when reduced).
    """
    if seeds.ndim != 1:
        raise ValueError(f"seeds must be a 1-D tensor of per-sample seeds, got shape {tuple(seeds.shape)}.")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}.")
    stats = FeatureStats(extractor.dim, extractor=extractor.name)
    for i in range(0, seeds.shape[0], batch):
        s = seeds[i : i + batch]
        with torch.no_grad():
            images = generate(s)
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != s.shape[0]:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"generate(seeds) must return uint8 images [{s.shape[0]}, C, H, W] for {s.shape[0]} seeds, got {got}.")
        features = extractor(images)
        stats.update(features)
        if on_features is not None:
            on_features(s, features)
    if all_reduce:
        stats.all_reduce_()
    return stats


def fd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians fitted to two FeatureStats (see ``fd.frechet_distance``).

    Both must come from the same extractor: distances in different feature spaces are not comparable.
    """
    if a.dim != b.dim:
        raise ValueError(f"Cannot compare feature statistics of dimension {a.dim} and {b.dim}.")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise ValueError(f"Cannot compare statistics from extractor {a.extractor!r} with {b.extractor!r}.")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
