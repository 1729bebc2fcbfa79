"""`ectune ref-stats`: compute and cache the reference feature statistics of a dataset, configured by a preset's
data settings and `--data.FIELD` options only."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Sequence

import tyro

from ..config import DataConfig, RunConfig
from ..evaluation import check_metric, load_extractor, reference_cache_path, reference_for_data
from ..presets import get_preset, preset_names
from .common import parse, parse_known
from .eval import CacheDir, MetricName, WeightsFile


@dataclass(frozen=True, kw_only=True)
class RefStatsArgs:
    """compute and cache the reference feature statistics of a dataset; data fields follow as --data.FIELD VALUE
    (e.g. --data.source idx --data.path DIR)"""

    preset: Annotated[str | None, tyro.conf.arg(
        metavar="NAME", help=f"take the data settings of a preset: {', '.join(preset_names())}",
        help_behavior_hint="(optional)")] = None
    metric: MetricName = "lite0"
    weights: WeightsFile = None
    """feature-extractor weights file"""
    cache_dir: CacheDir = None
    """cache folder"""
    max_images: int = 0
    """evenly spaced subset of this many images (0 = all)"""
    batch: int = 250
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)  # defaults: the preset's data settings


def run(command: str, argv: Sequence[str]) -> int:
    from ..data import open_dataset
    from ..runtime.device import resolve_device

    first, unknown = parse_known(RefStatsArgs, argv)
    check_metric(first.metric)
    stray = [o for o in unknown if o.startswith("-") and not o.startswith("--data.")]
    if stray:
        raise ValueError(f"ectune ref-stats: unknown option(s) {' '.join(stray)}; only --data.FIELD options configure the data")
    base = get_preset(first.preset, "pretrain") if first.preset else RunConfig()
    a = parse(RefStatsArgs, command, argv, default=RefStatsArgs(data=base.data))
    a.data.check()
    device = resolve_device(a.device)
    data = open_dataset(a.data)
    ext = load_extractor(a.metric, device=device, weights=a.weights)
    t0 = time.time()
    stats = reference_for_data(data, a.data.split, ext, cache_dir=a.cache_dir, max_images=a.max_images, batch=a.batch)
    print(f"{ext.report_name} reference statistics of {data.description} ({a.data.split}, {stats.count} images, "
          f"{time.time() - t0:.1f}s)")
    print(reference_cache_path(stats, a.cache_dir))
    return 0
