"""Images -> an encoded latent dataset (the layout of ectune.data.latents), resumably.

Each image is centre-cropped to a square and resized to `resolution` (Lanczos, as `convert-images` does), encoded
by the VAE, and its posterior mean (and std, with `store_posterior`) normalised and written in shards of
`shard_size` images. Every shard is written atomically and carries digests of the settings and of the names of the
images it holds, so a rerun skips the shards that are done and rewrites any other; dataset.json is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.convert import _class_labels, _prepare
from ..data.edm import ImageSource, decode_image, image_array, parallel_map, read_labels
from ..data.errors import DataError
from ..data.latents import DATASET_FILE, FORMAT, SETTINGS_FILE, VERSION, shard_name
from ..runtime.checkpoint import atomic_write, atomic_write_text
from .norm import LatentNorm
from .vae import LatentCodec


@dataclass(frozen=True)
class EncodeSettings:
    """What determines the stored latents; a rerun must use the same."""

    vae: str
    resolution: int
    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    final_std: float
    posterior: bool
    shard_size: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def encode_dataset(
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    codec: LatentCodec,
    settings: EncodeSettings,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Encode the PNG/JPEG images under `images` (folder or .zip; labels from its dataset.json or first-level class
    subfolders) into `out`. Returns dataset.json's content. `progress(done, total)` is called after each shard."""
    src, out = Path(images), Path(out)
    if not 8 <= settings.resolution <= 4096 or settings.resolution % codec.factor:
        raise DataError(f"--resolution {settings.resolution}: expected a size in [8, 4096] divisible by the VAE's "
                        f"downsampling factor {codec.factor}")
    if settings.shard_size < 1:
        raise DataError(f"--shard-size {settings.shard_size}: expected an integer >= 1")
    norm = LatentNorm(settings.raw_mean, settings.raw_std, settings.final_std)
    if norm.channels != codec.latent_channels:
        raise DataError(f"--latent-mean/--latent-std give {norm.channels} channels but the VAE {settings.vae} has "
                        f"{codec.latent_channels} latent channels")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    with ImageSource(src) as source:
        names = source.image_names()
        if not names:
            raise DataError(f"{src} contains no PNG/JPEG images")
        labels = _labels(source, names, src)
        shards = []
        for k, first in enumerate(range(0, len(names), settings.shard_size)):
            part = names[first : first + settings.shard_size]
            shard = out / shard_name(k)
            shards.append(shard.name)
            if not _shard_done(shard, settings, part):
                _write_shard(shard, source, part, None if labels is None else labels[first : first + len(part)],
                             codec, norm, settings)
            if progress is not None:
                progress(min(first + len(part), len(names)), len(names))
    for stale in sorted(out.glob("latents-*.safetensors")):
        if stale.name not in shards:  # left by an earlier, larger image folder with the same settings
            stale.unlink()
    h = settings.resolution // codec.factor
    meta = {"format": FORMAT, "version": VERSION, "vae": settings.vae, "resolution": settings.resolution,
            "latent_shape": [codec.latent_channels, h, h], "raw_mean": list(settings.raw_mean),
            "raw_std": list(settings.raw_std), "final_std": settings.final_std, "posterior": settings.posterior,
            "count": len(names), "shards": shards, "source": str(src),
            "labels": None if labels is None else [[n, lab] for n, lab in zip(names, labels)]}
    atomic_write_text(out / DATASET_FILE, json.dumps(meta))
    return meta


def _check_settings(out: Path, settings: EncodeSettings) -> None:
    path = out / SETTINGS_FILE
    want = {"format": FORMAT, "version": VERSION, **asdict(settings)}
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            have = None
        have = {k: (tuple(v) if isinstance(v, list) else v) for k, v in have.items()} if isinstance(have, dict) else None
        if have != want:
            raise DataError(f"{out} was encoded with other settings ({path}: {have}); use a new OUT folder or the same "
                            "options to resume")
        return
    if any(out.iterdir()):
        raise DataError(f"{out} is not empty and has no {SETTINGS_FILE}; expected a new folder or one this command wrote")
    atomic_write_text(path, json.dumps(want))


def _labels(source: ImageSource, names: list[str], src: Path) -> list[int] | None:
    stored = read_labels(source)
    if stored is not None:
        missing = [n for n in names if n not in stored]
        if missing:
            raise DataError(f"{source.where('dataset.json')} has no label for {len(missing)} image(s), e.g. {missing[0]}")
        return [stored[n] for n in names]
    return _class_labels(names, src)


def _shard_done(shard: Path, settings: EncodeSettings, names: list[str]) -> bool:
    if not shard.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a torn or foreign file: rewrite it
        return False
    return meta.get("settings") == settings.digest() and meta.get("names") == _names_digest(names) \
        and meta.get("count") == str(len(names))


def _write_shard(shard: Path, source: ImageSource, names: list[str], labels: list[int] | None, codec: LatentCodec,
                 norm: LatentNorm, settings: EncodeSettings) -> None:
    from safetensors.torch import save

    def load(name: str) -> np.ndarray:
        img = _prepare(decode_image(source.read(name), source.where(name)), resolution=settings.resolution, channels=3)
        return image_array(img)

    pixels = torch.from_numpy(np.stack(list(parallel_map(load, names)))).permute(0, 3, 1, 2)
    device = getattr(codec, "device", "cpu")
    mean, std = codec.encode(pixels.to(device).float() / 127.5 - 1.0)
    tensors = {"mean": norm.normalize(mean).cpu().contiguous()}
    if settings.posterior:
        tensors["std"] = norm.normalize_std(std).cpu().contiguous()
    if labels is not None:
        tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
    meta = {"settings": settings.digest(), "names": _names_digest(names), "count": str(len(names))}
    data = save(tensors, metadata=meta)
    atomic_write(shard, lambda f: f.write(data))
