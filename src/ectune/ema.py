"""Exponential moving averages of the weights: fixed β, half-life in images, and EDM2's power-function EMA.

The β formulas are pure functions of progress (images seen); `EMA` only holds the averaged tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .config import EMAConfig


def halflife_beta(batch: int, halflife_nimg: float) -> float:
    """β per step for a half-life measured in images: 0.5^(batch / half-life), so it is batch-size independent."""
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))


def power_gamma(sigma_rel: float) -> float:
    """EDM2's exponent γ for a relative standard deviation σ_rel of the power-function EMA profile:
    σ_rel² = (γ+1) / ((γ+2)²(γ+3)), i.e. the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²)."""
    if not 0 < sigma_rel < 0.2887:  # γ > 0 requires σ_rel < 1/√12
        raise ValueError(f"sigma_rel must be in (0, 0.2887), got {sigma_rel}")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(nimg: float, batch: int, gamma: float) -> float:
    """β of the power-function EMA after the step that brings progress to `nimg`: (1 − batch/nimg)^(γ+1)."""
    return (1.0 - batch / nimg) ** (gamma + 1) if nimg > batch else 0.0


def ema_betas(cfg: EMAConfig, *, nimg: float, batch: int) -> list[float]:
    """The β of every tracked average for one optimiser step (nimg counted after the step)."""
    if cfg.kind == "fixed":
        return [cfg.beta]
    if cfg.kind == "halflife":
        return [halflife_beta(batch, cfg.halflife_kimg * 1000)]
    if cfg.kind == "power":
        return [power_beta(nimg, batch, power_gamma(s)) for s in cfg.sigma_rels]
    raise ValueError(f"unknown EMA kind {cfg.kind!r}; expected 'fixed', 'halflife' or 'power'")


class EMA:
    """Averaged copies of a module's floating-point parameters and buffers (one copy per tracked β).

    Names are the module's state_dict keys, so `state_dict(i)` loads straight into the same architecture.
    """

    def __init__(self, module: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        count = len(cfg.sigma_rels) if cfg.kind == "power" else 1
        src = module.state_dict()
        self.names = [k for k, v in src.items() if v.is_floating_point()]
        self.averages: list[list[Tensor]] = [[src[k].detach().clone().float() for k in self.names] for _ in range(count)]
        self._other = {k: v.detach().clone() for k, v in src.items() if not v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, *, nimg: float, batch: int) -> None:
        src = module.state_dict()
        current = [src[k].detach().float() for k in self.names]
        for avg, beta in zip(self.averages, ema_betas(self.cfg, nimg=nimg, batch=batch)):
            torch._foreach_lerp_(avg, current, 1.0 - beta)  # avg ← β·avg + (1 − β)·current

    def state_dict(self, index: int = 0) -> dict[str, Tensor]:
        """The index-th average as a module state_dict."""
        out = dict(zip(self.names, self.averages[index]))
        out.update(self._other)
        return out

    def to_state(self) -> dict[str, Tensor]:
        """All averages flattened for a training-state file (plain tensors, weights_only-loadable)."""
        return {f"{i}/{k}": v for i, avg in enumerate(self.averages) for k, v in zip(self.names, avg)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        for i, avg in enumerate(self.averages):
            for j, k in enumerate(self.names):
                key = f"{i}/{k}"
                if key not in state:
                    raise ValueError(f"training state lacks EMA tensor {key!r}")
                avg[j].copy_(state[key])

    @property
    def labels(self) -> list[str]:
        """A name for each tracked average (used in exported file names)."""
        if self.cfg.kind == "power":
            return [f"sigma_rel{s:g}" for s in self.cfg.sigma_rels]
        return ["ema"]

