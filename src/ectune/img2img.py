"""Image-to-image sampling in the SDEdit manner, with a consistency model: noise a given image to time t, then
take consistency steps from there instead of from pure noise (REFERENCE §5 with t_max replaced by t):

    x = x_img + t·z_0,   x ← f(x, t),   then for each later τ_i:  x ← f(x + τ_i·z_i, τ_i)

A small t keeps the image's layout and detail; t near t_max forgets it. z_i are the per-sample noises of
`sampling.generate` (stream i of seed n), so image-to-image from a blank image at t = t_max is ordinary sampling.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .sampling import Model, consistency_sample, per_sample_normal


def strength_to_t(strength: float, *, sigma_data: float = 0.5, t_max: float = 80.0) -> float:
    """The time t of a `strength` s ∈ (0, 1]: the share of the noised image's standard deviation that is noise for
    data of standard deviation σ_d, s = t/√(t² + σ_d²), so t = σ_d·s/√(1 − s²), capped at t_max (s = 1: t_max).
    For σ_d = 0.5: s = 0.5 → t ≈ 0.289, s = 0.8 → 0.667, s = 0.9 → 1.03, s = 0.99 → 3.51."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if strength == 1:
        return float(t_max)
    return min(sigma_data * strength / math.sqrt(1 - strength**2), float(t_max))


def img2img_sigmas(t: float, steps: int, mid_t: Sequence[float], *, explicit: bool, t_max: float = 80.0) -> Tensor:
    """Times of `steps`-step image-to-image sampling from t: t, then steps − 1 intermediate times below t.

    With `explicit` (the caller chose `mid_t`) every given time must lie below t; otherwise (the model's default
    times) those at or above t are skipped."""
    if not 0 < t <= t_max:
        raise ValueError(f"the starting time t must be in (0, t_max = {t_max}], got {t}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if explicit and any(m >= t for m in mid_t[: steps - 1]):
        raise ValueError(f"intermediate times {list(mid_t[: steps - 1])} must lie below the starting time t = {t}")
    below = [float(m) for m in mid_t if m < t]
    if len(below) < steps - 1:
        raise ValueError(f"{steps} steps from t = {t} need {steps - 1} intermediate time(s) below it, "
                         f"have {below or 'none'}: pass them with --mid-t (mid_t=)")
    return torch.tensor([float(t), *below[: steps - 1]], dtype=torch.float64)


@torch.no_grad()
def img2img_sample(
    model: Model,
    images: Tensor,
    seeds: Tensor,
    *,
    sigmas: Tensor | Sequence[float],
    class_labels: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images [N, C, H, W] in [-1, 1] re-generated from `images` (same shape, [-1, 1]) noised to sigmas[0], sample
    n from seed n."""
    shape = tuple(images.shape[1:])
    x = images.to(device).float() + per_sample_normal(seeds, shape, stream=0, device=device) * float(sigmas[0])
    return consistency_sample(model, x, sigmas, class_labels=class_labels,
                              noise=lambda i: per_sample_normal(seeds, shape, stream=i, device=device))
