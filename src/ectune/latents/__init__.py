"""Latent-space ECT (EDM2's ImageNet-512 setting): the latent normalisation, the VAE that maps pixels to latents and
back, and the dataset encoder. See docs/latents.md.

    from ectune.latents import LatentNorm, load_vae
    vae, norm = load_vae("stabilityai/sd-vae-ft-mse", device="cuda"), LatentNorm()
    mean, std = vae.encode(images)              # images [N, 3, 512, 512] in [-1, 1] -> raw posterior [N, 4, 64, 64]
    x = norm.normalize(mean)                    # the model's latents: mean 0, std 0.5 per channel
    pixels = vae.decode(norm.denormalize(x))    # back to [-1, 1]

Importing this package does not import diffusers; `load_vae` does.
"""

from .norm import DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD, FINAL_STD, LatentNorm
from .vae import DiffusersVAE, LatentCodec, load_vae

__all__ = ["DEFAULT_VAE", "EDM2_RAW_MEAN", "EDM2_RAW_STD", "FINAL_STD", "DiffusersVAE", "LatentCodec", "LatentNorm",
           "load_vae", "norm_of", "decode_to_images"]


def norm_of(data_cfg) -> LatentNorm:  # data_cfg: ectune.config.DataConfig with a VAE
    """The LatentNorm a DataConfig records (its `latent_mean`, `latent_std`)."""
    return LatentNorm(raw_mean=tuple(data_cfg.latent_mean), raw_std=tuple(data_cfg.latent_std))


def decode_to_images(latents, data_cfg, *, device="cpu"):
    """A latent model's outputs [N, C, h, w] -> images in [-1, 1], through the VAE and normalisation its config
    records (`data_cfg.vae`, `latent_mean`, `latent_std`)."""
    vae = load_vae(data_cfg.vae, device=device)
    return vae.decode(norm_of(data_cfg).denormalize(latents.to(device))).clamp(-1, 1)
