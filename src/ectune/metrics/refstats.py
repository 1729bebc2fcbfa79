"""Reference (dataset) feature statistics, computed once and cached as .npz files.

A cache file is named by a key that says everything the numbers depend on: dataset, split, extractor and
resolution (see ``ref_key``). Files hold plain arrays (``FeatureStats.save``) and are written atomically,
so an interrupted run never leaves a truncated cache behind.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .extractors import FeatureExtractor
from .fd import FeatureStats
from .paths import default_cache_dir

__all__ = ["content_fingerprint", "default_cache_dir", "ref_key", "reference_stats", "stats_of_images"]

_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


def content_fingerprint(images_u8: Tensor) -> str:
    """16 hex digits of a BLAKE2b hash of the images' shape and pixels: two datasets share it only if they hold
    the same images in the same order (a path or a description alone says nothing about the files' content)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(images_u8.shape)).encode())
    h.update(memoryview(images_u8.detach().cpu().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def ref_key(dataset_desc: str, split: str, extractor_name: str, *, resolution: int, fingerprint: str = "") -> str:
    """A filename-safe cache key for reference statistics.

    `fingerprint` (``content_fingerprint`` of the images) ties the key to the data's content, so replacing the
    files behind a path gives a new key instead of stale statistics.

    Each part is reduced to [A-Za-z0-9.-] (runs of anything else become "-"), the parts are joined by "__",
    and an 8-hex-digit hash of the unreduced parts is appended, so that descriptions differing only in
    removed characters (e.g. "a/b" and "a b") still get different files. Long descriptions are shortened
    (the hash keeps them distinct).

    Example: ref_key("fashion-mnist", "test", "lite0", resolution=28) -> "fashion-mnist__test__lite0__28px__<hash8>".
    """
    raw = "\x1f".join([dataset_desc, split, extractor_name, str(int(resolution)), *([fingerprint] if fingerprint else [])])
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:8]
    parts = [_UNSAFE.sub("-", p).strip("-.") or "x" for p in (dataset_desc, split, extractor_name)]
    parts[0] = parts[0][:80]
    return "__".join([*parts, f"{int(resolution)}px", digest])


def _batches(images: Tensor | Iterable[Tensor], batch: int) -> Iterator[Tensor]:
    """Yield uint8 batches of at most ``batch`` images from a tensor [N, C, H, W] or an iterable of tensors."""
    if isinstance(images, Tensor):
        for i in range(0, images.shape[0], batch):
            yield images[i : i + batch]
        return
    for chunk in images:
        if isinstance(chunk, (tuple, list)):  # (images, labels) pairs from a DataLoader
            chunk = chunk[0]
        for i in range(0, chunk.shape[0], batch):
            yield chunk[i : i + batch]


def stats_of_images(
    images: Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    batch: int = 250,
    key: str = "",
) -> FeatureStats:
    """Feature statistics of a set of uint8 images [N, C, H, W] (a tensor or an iterable of batches).

    Not cached; see ``reference_stats`` for the cached version.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}.")
    stats = FeatureStats(extractor.dim, extractor=extractor.name, key=key)
    for x in _batches(images, batch):
        stats.update(extractor(x))
    return stats


def _load_cache(path: Path) -> FeatureStats:
    """A cache file, checked: readable, at least 2 images, finite numbers. Anything else is one error naming it."""
    try:
        stats = FeatureStats.load(path)
    except Exception as e:  # a half-written or foreign file fails in numpy/zipfile in many ways: one message
        raise ValueError(f"cached statistics {path} are unreadable ({e}); delete the file to recompute them") from None
    if stats.count < 2 or not (np.isfinite(stats.sum).all() and np.isfinite(stats.sum_outer).all()):
        raise ValueError(f"cached statistics {path} are invalid (count {stats.count}, non-finite values or fewer "
                         "than 2 images); delete the file to recompute them")
    return stats


def reference_stats(
    images_u8: Tensor | Iterable[Tensor],
    extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    key: str,
    batch: int = 250,
    recompute: bool = False,
) -> FeatureStats:
    """Statistics of a reference image set, loaded from ``<cache_dir>/<key>.npz`` or computed and saved there.

    Args:
        images_u8: uint8 images [N, C, H, W], or an iterable of such batches (or of (images, labels) pairs).
            Only read when the cache file is missing, so passing a lazy iterable avoids loading the data.
        extractor: feature extractor; its name must match the one recorded in an existing cache file.
        cache_dir: folder of cache files; default ``default_cache_dir()``.
        key: cache key, normally from ``ref_key``; must be a plain file name.
        batch: images per extractor call.
        recompute: ignore and overwrite an existing cache file.

    Returns:
        FeatureStats with ``key`` and ``extractor`` set.
    """
    if not key or key != Path(key).name or key.startswith("."):
        raise ValueError(f"reference_stats key must be a plain file name (use ref_key), got {key!r}.")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{key}.npz"
    if path.is_file() and not recompute:
        stats = _load_cache(path)
        if stats.extractor != extractor.name or stats.dim != extractor.dim:
            raise ValueError(
                f"Cached statistics {path} were made with extractor {stats.extractor!r} (dim {stats.dim}), not "
                f"{extractor.name!r} (dim {extractor.dim}); use a key that names the extractor, or recompute=True."
            )
        return stats
    with torch.no_grad():
        stats = stats_of_images(images_u8, extractor, batch=batch, key=key)
    if stats.count < 2:
        raise ValueError(f"Reference set for {key!r} has {stats.count} image(s); a covariance needs at least 2.")
    stats.save(path)
    return stats
