"""EDM preconditioning: f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (Eq. 7).

Precision is decided here and only here: the scalings, the skip connection and the output are fp32; the
inner network alone runs under autocast when a reduced precision is asked for.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def edm_scalings(sigma: Tensor, *, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM scalings (c_skip, c_out, c_in, c_noise) for noise level σ = t:
    c_skip = σ_d²/(σ²+σ_d²), c_out = σ·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4."""
    sigma = torch.as_tensor(sigma)
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = s2.rsqrt()
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def shifted_scalings(
    sigma: Tensor, *, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference code's σ_min-shifted boundary (exact at t = σ_min instead of 0):
    c_skip = σ_d²/((σ−σ_min)²+σ_d²), c_out = (σ−σ_min)·σ_d/√(σ²+σ_d²); c_in, c_noise as EDM."""
    _, _, c_in, c_noise = edm_scalings(sigma, sigma_data=sigma_data)
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in, c_noise


class Precond(nn.Module):
    """The consistency/denoising function f_θ(x, σ) around any network with the ectune net signature.

    forward(x [N,C,H,W], sigma [N] or scalar, class_labels [N] int or [N,label_dim] one-hot | None,
    dropout_key [N] int64 | None) -> fp32 [N,C,H,W]. Rows with σ = 0 return x exactly (boundary f(x, 0) = x).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        sigma_data: float = 0.5,
        sigma_min_shift: float = 0.0,
        label_dim: int = 0,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min_shift = float(sigma_min_shift)
        self.label_dim = int(label_dim)
        self.compute_dtype = compute_dtype

    def _labels(self, class_labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional ({self.label_dim} classes): pass class labels")
        if class_labels.dtype in (torch.int64, torch.int32):
            return nn.functional.one_hot(class_labels.long(), self.label_dim).float().to(device)
        return class_labels.float().reshape(n, self.label_dim).to(device)

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, *, dropout_key: Tensor | None = None
    ) -> Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        s = sigma.reshape(-1, 1, 1, 1)
        # ln(0) would poison the rows with σ = 0; those rows are replaced by x below anyway.
        s_safe = s.clamp_min(1e-20)
        if self.sigma_min_shift > 0:
            c_skip, c_out, c_in, c_noise = shifted_scalings(s_safe, sigma_data=self.sigma_data, sigma_min=self.sigma_min_shift)
        else:
            c_skip, c_out, c_in, c_noise = edm_scalings(s_safe, sigma_data=self.sigma_data)
        labels = self._labels(class_labels, x.shape[0], x.device)
        with self._autocast(x.device):
            F_x = self.net(c_in * x, c_noise.reshape(-1), labels, dropout_key=dropout_key)
        out = c_skip * x + c_out * F_x.float()
        return torch.where(s == 0, x, out)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)


def replace_precond(model: Precond, *, net: nn.Module | None = None, sigma_min_shift: float | None = None) -> Precond:
    """A Precond sharing `model`'s network and settings, with `net` (e.g. a compiled view of the same network) and/or
    the boundary σ_min replaced (None keeps `model`'s). No weights are copied."""
    return Precond(
        model.net if net is None else net,
        sigma_data=model.sigma_data,
        sigma_min_shift=model.sigma_min_shift if sigma_min_shift is None else sigma_min_shift,
        label_dim=model.label_dim,
        compute_dtype=model.compute_dtype,
    )
