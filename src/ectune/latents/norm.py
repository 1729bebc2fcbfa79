"""The latent normalisation of EDM2's ImageNet-512 models: each VAE latent channel mapped to mean 0, std 0.5.

    x_final = (x_raw − raw_mean) · final_std / raw_std            x_raw = x_final · raw_std / final_std + raw_mean

"Raw" is the Stable Diffusion VAE's posterior latent as `AutoencoderKL.encode` returns it, *without* the VAE's
`scaling_factor` (0.18215): EDM2's raw standard deviations (3.3–4.6) are the size of unscaled latents (their overall
std is about 1/0.18215 ≈ 5.5; scaled latents would have std ≈ 1), and `AutoencoderKL.decode` takes unscaled latents,
so the inverse above feeds the decoder directly. A posterior draw x_raw = μ + s·ε is linear in ε, so it normalises to
norm(μ) + s·(final_std/raw_std)·ε: storing the normalised mean and scaled std loses nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# EDM2's statistics of ImageNet-512's unscaled sd-vae-ft-mse latents, per channel.
EDM2_RAW_MEAN: tuple[float, ...] = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD: tuple[float, ...] = (4.17, 4.62, 3.71, 3.28)
FINAL_STD = 0.5  # = σ_data: normalised latents have the scale the EDM preconditioning assumes


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel affine map between raw VAE latents and the model's latents (module docstring)."""

    raw_mean: tuple[float, ...] = EDM2_RAW_MEAN
    raw_std: tuple[float, ...] = EDM2_RAW_STD
    final_std: float = FINAL_STD

    def __post_init__(self) -> None:
        if not self.raw_mean or len(self.raw_mean) != len(self.raw_std):
            raise ValueError(f"latent normalisation: expected one raw mean and one raw std per latent channel, got "
                             f"{len(self.raw_mean)} means and {len(self.raw_std)} stds")
        if not all(math.isfinite(m) for m in self.raw_mean) or not all(math.isfinite(s) and s > 0 for s in self.raw_std):
            raise ValueError(f"latent normalisation: means must be finite and stds > 0, got {self.raw_mean}, {self.raw_std}")
        if not (math.isfinite(self.final_std) and self.final_std > 0):
            raise ValueError(f"latent normalisation: final_std must be > 0, got {self.final_std}")

    @property
    def channels(self) -> int:
        return len(self.raw_mean)

    def _consts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"latent normalisation: expected latents [N, {self.channels}, H, W], got {tuple(x.shape)}")
        mean = torch.tensor(self.raw_mean, dtype=torch.float64).view(1, -1, 1, 1)
        scale = (self.final_std / torch.tensor(self.raw_std, dtype=torch.float64)).view(1, -1, 1, 1)
        return mean.to(x.device, torch.float32), scale.to(x.device, torch.float32)

    def normalize(self, x_raw: Tensor) -> Tensor:
        """Raw latents [N, C, H, W] -> the model's latents (mean 0, std final_std for data with the raw statistics)."""
        mean, scale = self._consts(x_raw)
        return (x_raw.float() - mean) * scale

    def denormalize(self, x: Tensor) -> Tensor:
        """The model's latents -> raw latents (what `AutoencoderKL.decode` takes)."""
        mean, scale = self._consts(x)
        return x.float() / scale + mean

    def normalize_std(self, std_raw: Tensor) -> Tensor:
        """A raw posterior std -> the std of the normalised draw (the mean shift does not apply)."""
        _, scale = self._consts(std_raw)
        return std_raw.float() * scale
