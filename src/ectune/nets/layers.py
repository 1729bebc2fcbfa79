"""Building blocks shared by the DDPM++ and EDM2 networks.

Only things whose maths is identical in both families live here: attention over channel-major feature maps,
per-block gradient checkpointing, resolution bookkeeping and parameter counting.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def count_params(module: nn.Module) -> int:
    """Number of trainable-or-not parameters (buffers excluded); works on 'meta' modules too."""
    return sum(p.numel() for p in module.parameters())


def attention_heads(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(qᵀk/√c)·v per head, on channel-major tensors.

    q, k, v: [N, heads, c, L] (c channels per head, L = H·W positions). Returns [N, heads, c, L].
    EDM and EDM2 write this as two einsums; scaled_dot_product_attention computes the same thing with
    the default scale 1/√c and picks a fused kernel where one exists.
    """
    out = nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2)


def maybe_checkpoint(enabled: bool, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """Run `fn(*args)`, under non-reentrant gradient checkpointing when `enabled` and grad is on.

    Checkpointing only pays off when a backward pass will follow, so no-grad passes (ECT's target pass,
    sampling) run the block directly. Keyed dropout makes the recomputation reproduce the same mask.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def level_resolutions(img_resolution: int, num_levels: int) -> list[int]:
    """Feature resolution of each UNet level, checking that every halving is exact.

    The down/up-sampling pairs only line up when the image side is divisible by 2**(num_levels - 1)
    (e.g. 28×28 Fashion-MNIST must be padded to 32×32 for three levels).
    """
    if img_resolution % (1 << (num_levels - 1)) != 0:
        raise ValueError(
            f"img_resolution {img_resolution} must be divisible by 2**{num_levels - 1} for a UNet with "
            f"{num_levels} levels (channel_mult); pad the images (DataConfig.resolution) or use fewer levels"
        )
    return [img_resolution >> level for level in range(num_levels)]
