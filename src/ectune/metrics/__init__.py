"""Evaluation metrics: Fréchet distances on image features, and k-NN precision/recall.

Typical use (offline, FD-Lite0)::

    from ectune.metrics import get_extractor, reference_stats, ref_key, stats_of_generator, fd_from_stats

    ext = get_extractor("lite0")                                  # or "inception" (FID), "dinov2" (FD-DINOv2)
    ref = reference_stats(train_u8, ext, key=ref_key("fashion-mnist", "train", ext.name, resolution=28))
    gen = stats_of_generator(lambda s: sample_u8(net, s), torch.arange(10_000), ext, batch=250)
    print(ext.report_name, fd_from_stats(gen, ref))

Report a number under ``ext.report_name``: only the "inception" extractor gives FID.
"""

from .evaluate import fd_from_stats, stats_of_generator
from .extractors import (
    DINOv2Extractor,
    ExtractorUnavailableError,
    FeatureExtractor,
    InceptionExtractor,
    Lite0Extractor,
    get_extractor,
)
from .fd import FeatureStats, frechet_distance
from .paths import default_cache_dir
from .prdc import PRDC, knn_radii, prdc, precision_recall
from .refstats import content_fingerprint, ref_key, reference_stats, stats_of_images

__all__ = [
    "DINOv2Extractor",
    "ExtractorUnavailableError",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionExtractor",
    "Lite0Extractor",
    "PRDC",
    "content_fingerprint",
    "default_cache_dir",
    "fd_from_stats",
    "frechet_distance",
    "get_extractor",
    "knn_radii",
    "precision_recall",
    "prdc",
    "ref_key",
    "reference_stats",
    "stats_of_generator",
    "stats_of_images",
]
