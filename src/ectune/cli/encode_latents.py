"""`ectune encode-latents IMAGES OUT`: images -> VAE latents in the layout `--data.source latents` reads (resumable:
rerun the same command to finish an interrupted encoding)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import tyro

from ..latents.norm import DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD, FINAL_STD
from .common import Flag, parse


@dataclass(frozen=True, kw_only=True)
class EncodeLatentsArgs:
    """encode a folder or .zip of images into a latent dataset with a Stable Diffusion VAE (see docs/latents.md)"""

    images: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="IMAGES")]
    """folder or .zip of PNG/JPEG images; labels from its dataset.json or first-level class subfolders"""
    out: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """output folder (rerun with the same options to resume)"""
    resolution: int = 512
    """centre-crop each image to a square and resize it to this size before encoding"""
    vae: str = DEFAULT_VAE
    """diffusers AutoencoderKL folder or Hub id"""
    latent_mean: tuple[float, ...] = EDM2_RAW_MEAN
    """raw (unscaled) latent mean per channel, mapped to 0"""
    latent_std: tuple[float, ...] = EDM2_RAW_STD
    """raw latent std per channel, mapped to 0.5"""
    store_posterior: Flag = False
    """also store the posterior std, so training can draw a fresh latent per image seen (EDM2); doubles the size"""
    shard_size: int = 1000
    """images per shard (the unit of resumption)"""
    batch: int = 8
    """images per VAE call"""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:1, ..."""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(EncodeLatentsArgs, command, argv)
    if not a.images.exists():
        raise FileNotFoundError(f"IMAGES {a.images}: no such folder or .zip")
    if a.out.exists() and not a.out.is_dir():
        raise ValueError(f"OUT {a.out} is a file; expected a folder (new, or one this command wrote)")
    if a.batch < 1:
        raise ValueError(f"--batch {a.batch}: expected an integer >= 1")
    from ..latents.encode import EncodeSettings, encode_dataset
    from ..latents.norm import LatentNorm
    from ..latents.vae import DiffusersVAE
    from ..runtime.device import resolve_device

    LatentNorm(tuple(a.latent_mean), tuple(a.latent_std))  # a bad --latent-mean/--latent-std stops before the VAE loads
    codec = DiffusersVAE(a.vae, device=resolve_device(a.device), batch=a.batch)
    settings = EncodeSettings(vae=a.vae, resolution=a.resolution, raw_mean=tuple(a.latent_mean),
                              raw_std=tuple(a.latent_std), final_std=FINAL_STD, posterior=a.store_posterior,
                              shard_size=a.shard_size)
    t0 = time.time()
    meta = encode_dataset(a.images, a.out, codec, settings,
                          progress=lambda done, total: print(f"encoded {done}/{total} images", flush=True))
    c, h, w = meta["latent_shape"]
    print(f"wrote {meta['count']} latents {c}×{h}×{w} ({'posterior mean and std' if a.store_posterior else 'posterior mean'}"
          f", {'labelled' if meta['labels'] else 'unlabelled'}) to {a.out} in {time.time() - t0:.1f} s")
    return 0
