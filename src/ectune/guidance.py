"""Guidance for consistency functions and denoisers: classifier-free guidance and autoguidance as one wrapper.

    f_w(x, σ, c) = f_g(x, σ, c_g) + w·(f(x, σ, c) − f_g(x, σ, c_g))

- classifier-free guidance: f_g is the model itself under the unconditional label (c_g = the all-zero label vector,
  which EDM2-style label embeddings read as "no class"); the model must have been trained to see it (label dropout);
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): f_g is a weaker model
  (smaller or trained less), given the same labels if it is conditional and none otherwise. A separately trained
  unconditional model as f_g is EDM2's form of classifier-free guidance.

w = 1 returns f exactly (no guidance); w > 1 extrapolates away from f_g. Each call evaluates both functions, so
guided sampling costs 2 NFE per step (autoguidance: one of them the weaker, usually cheaper, model). Applied to a
consistency function it guides the 1-step outputs directly; used as the target pass of ECT it is a guided teacher.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

Denoiser = Callable[..., Tensor]  # f(x, sigma, class_labels=None, *, dropout_key=None) -> Tensor


def unconditional_labels(n: int, label_dim: int, device: torch.device | str = "cpu") -> Tensor:
    """The all-zero label vectors [n, label_dim]: "no class" for a network with a linear label embedding."""
    return torch.zeros(n, label_dim, device=device)


class GuidedDenoiser(nn.Module):
    """f_w = f_g + w·(f − f_g) with the call of every ectune denoiser (module docstring).

    Args:
        model: f, a Precond (its `label_dim` tells how to build unconditional labels).
        weight: w >= 0; 1 = f unchanged.
        guide: f_g for autoguidance, or None for classifier-free guidance with `model` itself.
        label_dim: the model's class count, for a `model` that does not carry it (a compiled or hinted wrapper).
    `dropout_key` is passed to both calls, so a training-mode target pass keeps the student's dropout masks.
    """

    def __init__(self, model: Denoiser, *, weight: float, guide: Denoiser | None = None,
                 label_dim: int | None = None) -> None:
        super().__init__()
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"guidance weight must be a finite number >= 0 (1 = none), got {weight}")
        label_dim = int(getattr(model, "label_dim", 0)) if label_dim is None else int(label_dim)
        if guide is None and label_dim == 0:
            raise ValueError("classifier-free guidance needs a class-conditional model; this one is unconditional "
                             "(give a guide model for autoguidance)")
        self.model, self.guide, self.weight, self.label_dim = model, guide, float(weight), label_dim
        self.sigma_min_shift = getattr(model, "sigma_min_shift", 0.0)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, *,
                dropout_key: Tensor | None = None) -> Tensor:
        f = self.model(x, sigma, class_labels, dropout_key=dropout_key)
        if self.weight == 1.0:
            return f
        if self.guide is None:
            g_labels: Tensor | None = unconditional_labels(x.shape[0], self.label_dim, x.device)
        else:
            g_labels = class_labels if int(getattr(self.guide, "label_dim", 0)) > 0 else None
        g = self.guide if self.guide is not None else self.model
        f_g = g(x, sigma, g_labels, dropout_key=dropout_key)
        return f_g + self.weight * (f - f_g)


def check_guide_matches(model: nn.Module, guide: nn.Module, *, model_shape: tuple[int, ...],
                        guide_shape: tuple[int, ...], what: str) -> None:
    """A guide model must work on the same data (shape) and σ_data as the model it guides."""
    if model_shape != guide_shape:
        raise ValueError(f"{what}: the guide model works on {guide_shape} data, the model on {model_shape}")
    if getattr(model, "sigma_data", None) != getattr(guide, "sigma_data", None):
        raise ValueError(f"{what}: the guide model's sigma_data {getattr(guide, 'sigma_data', None)} differs from the "
                         f"model's {getattr(model, 'sigma_data', None)}")
