"""Latent datasets: the on-disk layout `ectune encode-latents` writes, reading it, and the keyed posterior draw.

    OUT/
      encode.json                 the settings of the encoding (written first; a rerun with other settings is refused)
      latents-00000.safetensors   shard: mean [n, C, h, w] float32 (normalised), std [n, C, h, w] (with the posterior),
      latents-00001.safetensors   labels [n] int64 (labelled data); metadata: first, count, settings and names digests
      dataset.json                written last: the format, VAE, normalisation, shards and EDM-style labels
                                  {"labels": [["relative/name.png", class_id], ...] or null}

Latents are stored normalised (ectune.latents.norm: mean 0, std 0.5 per channel for data with the recorded raw
statistics), so training reads them as they are. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .dataset import ImageDataset
from .errors import DataError

FORMAT = "ectune-latents"
VERSION = 1
DATASET_FILE = "dataset.json"
SETTINGS_FILE = "encode.json"


def shard_name(i: int) -> str:
    return f"latents-{i:05d}.safetensors"


def noise_seed(seed: int, position: int) -> int:
    """The 63-bit generator seed of the posterior draw at stream position `position`: a stable hash of both."""
    digest = hashlib.blake2b(f"ectune-latent-noise:{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def posterior_noise(positions: Tensor, *, seed: int, shape: tuple[int, ...]) -> Tensor:
    """ε [B, *shape] ~ N(0, I), row b from a generator seeded by `noise_seed(seed, positions[b])` (CPU, float32):
    sample p of the stream gets the same draw whatever the batch size, rank count or resume point, and a new one
    in every epoch (p grows by the dataset size each epoch)."""
    g = torch.Generator()
    rows = []
    for p in positions.tolist():
        g.manual_seed(noise_seed(seed, int(p)))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


def read_dataset_meta(path: Path) -> dict[str, Any]:
    """dataset.json of a complete latent dataset, checked for the fields readers use."""
    meta_path = path / DATASET_FILE
    if not meta_path.is_file():
        hint = (" (the encoding did not finish: rerun the same `ectune encode-latents` to complete it)"
                if (path / SETTINGS_FILE).is_file() else "")
        raise DataError(f"--data.path {path}: no {DATASET_FILE}; expected a folder written by `ectune encode-latents`{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: not an ectune latent dataset (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise DataError(f"{meta_path}: format version {meta.get('version')!r}, this ectune reads version {VERSION}")
    for key, kind in (("vae", str), ("raw_mean", list), ("raw_std", list), ("shards", list), ("count", int)):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{meta_path}: field {key!r} missing or not a {kind.__name__}")
    return meta


def load_latent_dataset(path: str | Path, *, use_labels: bool) -> tuple[ImageDataset, dict[str, Any]]:
    """The latents (and posterior std, if stored) of an encoded folder as an ImageDataset, with its dataset.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_dataset_meta(path)
    means, stds, labels = [], [], []
    for name in meta["shards"]:
        f = path / str(name)
        try:
            t = load_file(str(f))
        except (OSError, SafetensorError) as exc:
            raise DataError(f"cannot read latent shard {f} ({exc}); rerun `ectune encode-latents` to rewrite it") from None
        if "mean" not in t or t["mean"].dtype != torch.float32 or t["mean"].ndim != 4:
            raise DataError(f"{f}: expected a float32 tensor 'mean' [n, C, h, w]")
        if meta.get("posterior") and ("std" not in t or t["std"].shape != t["mean"].shape):
            raise DataError(f"{f}: dataset.json says the posterior was stored but the shard has no matching 'std'")
        means.append(t["mean"])
        if meta.get("posterior"):
            stds.append(t["std"].float())
        if "labels" in t:
            labels.append(t["labels"].long())
    if not means:
        raise DataError(f"{path / DATASET_FILE} lists no shards")
    shapes = {tuple(m.shape[1:]) for m in means}
    if len(shapes) != 1:
        raise DataError(f"{path}: shards hold latents of different shapes {sorted(shapes)}")
    mean = torch.cat(means).contiguous()
    if mean.shape[0] != meta["count"]:
        raise DataError(f"{path}: shards hold {mean.shape[0]} latents but {DATASET_FILE} says {meta['count']}")
    desc = f"latents {path} ({meta['vae']})"
    std = torch.cat(stds).contiguous() if stds else None
    if not use_labels:
        return ImageDataset(mean, None, 0, desc, images_std=std), meta
    if meta.get("labels") is None or len(labels) != len(means):
        raise DataError(f"data.use_labels is set but {path} has no labels (its images had no dataset.json labels or "
                        "class subfolders)")
    lab = torch.cat(labels)
    return ImageDataset(mean, lab, int(lab.max()) + 1, desc, images_std=std), meta


def check_matches_config(meta: dict[str, Any], path: Path, *, vae: str, latent_mean: tuple[float, ...],
                         latent_std: tuple[float, ...]) -> None:
    """The config must describe the latents it trains on (the model file records it, and sampling decodes with it)."""
    stored = (meta["vae"], tuple(float(v) for v in meta["raw_mean"]), tuple(float(v) for v in meta["raw_std"]))
    given = (vae, tuple(float(v) for v in latent_mean), tuple(float(v) for v in latent_std))
    if stored != given:
        flags = (f"--data.vae {stored[0]} --data.latent-mean {' '.join(map(str, stored[1]))} "
                 f"--data.latent-std {' '.join(map(str, stored[2]))}")
        raise DataError(f"{path / DATASET_FILE} was encoded with VAE {stored[0]!r}, raw mean {list(stored[1])} and raw std "
                        f"{list(stored[2])}, but the config says {given[0]!r}, {list(given[1])}, {list(given[2])}; "
                        f"train with {flags}")
