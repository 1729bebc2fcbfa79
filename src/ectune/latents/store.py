"""Writing a latent model's samples as latents (`ectune sample --latents`): .npy (the array alone) or .safetensors
(the tensor `latents` with the VAE and normalisation in its metadata, so anyone can decode them)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from torch import Tensor

from ..runtime.checkpoint import atomic_write
from .norm import FINAL_STD


def save_latents(path: Path | str, latents: Tensor, data_cfg, *, seeds: tuple[int, int]) -> None:
    """Latents [N, C, h, w] in the model's normalised space. To decode:
    x_raw = latents · latent_std / 0.5 + latent_mean (per channel), images = vae.decode(x_raw) in [-1, 1]."""
    path = Path(path)
    x = latents.detach().float().cpu().contiguous()
    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, x.numpy())
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        return
    from safetensors.torch import save

    meta = {"vae": data_cfg.vae, "latent_mean": json.dumps(list(data_cfg.latent_mean)),
            "latent_std": json.dumps(list(data_cfg.latent_std)), "final_std": str(FINAL_STD),
            "seeds": json.dumps(list(seeds)),
            "decode": "x_raw = latents * latent_std / final_std + latent_mean (per channel); images = vae.decode(x_raw)"}
    data = save({"latents": x}, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
