"""The encoder/decoder between pixels and latents, and its one implementation on diffusers' `AutoencoderKL`.

diffusers is optional (`pip install ectune[latents]`) and imported only when a VAE is loaded, so `import ectune`
never pays for it. Weights are read from safetensors only (`use_safetensors=True`): a VAE folder or Hub repository is
data, never a pickle.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor


class LatentCodec(Protocol):
    """Pixels <-> raw latents. Images are float [N, 3, H, W] in [-1, 1]; latents [N, C, H/f, W/f] (f = `factor`)."""

    latent_channels: int
    factor: int  # spatial downsampling of the encoder

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and std (raw, unscaled latents), float32 on the images' device."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (not clamped) for raw latents."""
        ...


class DiffusersVAE:
    """`diffusers.AutoencoderKL` as a LatentCodec: batched, on `device`, in fp32, in eval mode with no gradients."""

    def __init__(self, source: str, *, device: torch.device | str = "cpu", batch: int = 8) -> None:
        if batch < 1:
            raise ValueError(f"VAE batch must be >= 1, got {batch}")
        self.source, self.device, self.batch = source, torch.device(device), batch
        self.vae = _load_autoencoder_kl(source).to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1] != int(self.vae.config.in_channels):
            raise ValueError(f"VAE {self.source}: expected images [N, {self.vae.config.in_channels}, H, W] in [-1, 1], "
                             f"got {tuple(images.shape)}")
        means, stds = [], []
        for i in range(0, images.shape[0], self.batch):
            dist = self.vae.encode(images[i : i + self.batch].to(self.device, torch.float32)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"VAE {self.source}: expected latents [N, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        out = [self.vae.decode(latents[i : i + self.batch].to(self.device, torch.float32)).sample.float()
               for i in range(0, latents.shape[0], self.batch)]
        return torch.cat(out)


def _load_autoencoder_kl(source: str):  # -> diffusers.AutoencoderKL
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise RuntimeError(f"latent models need diffusers to load the VAE {source!r}: pip install 'ectune[latents]' "
                           f"({exc})") from None
    local = Path(source).expanduser()
    if source.startswith((".", "/", "~")) or local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {local}: no config.json; expected a diffusers AutoencoderKL folder "
                                    "(config.json + diffusion_pytorch_model.safetensors, as save_pretrained writes)")
        source = str(local)
    try:
        return AutoencoderKL.from_pretrained(source, use_safetensors=True)
    except Exception as exc:  # diffusers/huggingface_hub raise many kinds for a missing or broken source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"cannot load the VAE {source!r} ({first}); expected a diffusers AutoencoderKL folder with "
                      "safetensors weights, or a Hub id already in the Hugging Face cache or reachable from here") from None


_CACHE: dict[tuple[str, str], DiffusersVAE] = {}
_LOCK = threading.Lock()


def load_vae(source: str, *, device: torch.device | str = "cpu", batch: int = 8) -> DiffusersVAE:
    """The VAE `source` (a folder or Hub id) on `device`, loaded once per (source, device) and then reused."""
    key = (source, str(torch.device(device)))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = DiffusersVAE(source, device=device, batch=batch)
        return _CACHE[key]
