"""Moving uint8 batches to the device and into the networks' [-1, 1] float range."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DataError


def to_model_input(
    images_u8: Tensor,
    *,
    device: torch.device | str,
    xflip: bool = False,
    generator: torch.Generator | None = None,
    flip_mask: Tensor | None = None,
) -> Tensor:
    """uint8 [B, C, H, W] -> float32 [B, C, H, W] in [-1, 1] on `device` (x / 127.5 - 1). float32 input (latents,
    already in the model's scale) is moved unchanged.

    The uint8 tensor is transferred first and converted on the device (4x less host-to-device traffic).
    With xflip, row b is mirrored left-right where flip_mask[b] is True; pass `xflip_mask(positions, seed=...)`
    so the decision is per sample and reproducible. Without a mask a fair coin is drawn per row from
    `generator` (a CPU generator; the global RNG if None). flip_mask is only consulted when xflip is True.
    """
    if images_u8.dtype not in (torch.uint8, torch.float32) or images_u8.ndim != 4:
        raise DataError(
            f"to_model_input: expected uint8 images or float32 latents [B, C, H, W], got {images_u8.dtype} "
            f"{tuple(images_u8.shape)}"
        )
    if images_u8.dtype == torch.float32:
        x = images_u8.to(device, non_blocking=True)
    else:
        x = images_u8.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1.0
    if not xflip:
        return x
    b = x.shape[0]
    if flip_mask is None:
        flip_mask = torch.rand(b, generator=generator) < 0.5
    if flip_mask.dtype != torch.bool or tuple(flip_mask.shape) != (b,):
        raise DataError(f"to_model_input: flip_mask must be bool [{b}], got {flip_mask.dtype} {tuple(flip_mask.shape)}")
    mask = flip_mask.to(x.device).view(b, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)
