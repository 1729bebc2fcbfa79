"""EDM preconditioning: f_θ(x, t) = c_skip(t)·x + c_out(t)·F_θ(c_in(t)·x, c_noise(t)) (Eq. 7).

Precision is decided here and only here: the scalings, the skip connection and the output are fp32; the
inner network alone runs under autocast when a reduced precision is asked for. `resolve_precision` below is the
one rule that picks the precision of a training step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Precision:
    """How the inner network computes: `dtype` is its autocast dtype (fp32 = no autocast); `tf32` lets CUDA run
    the convolutions and matrix products of fp32 work in TF32 (inputs rounded to 10 mantissa bits)."""

    dtype: torch.dtype
    tf32: bool = False


# The "staged" policy, cheapest first: (largest r/t, precision). Each precision is used up to the largest r/t at
# which it kept ECT's Δ-noise ratio ‖Δ_low − Δ_fp32‖ / ‖Δ_fp32‖ (median over rows) at or below 0.1 on the most
# sensitive trained model measured with benchmarks/precision.py (docs/performance.md: bf16 0.080 at 0.7 and 0.097
# at 0.75; TF32 0.065 at 0.96875 and 0.13 at 0.984). Closer to 1, Δ = f(x_t, t) − f(x_r, r) would be mostly the
# two passes' rounding noise, so the rest runs in fp32 with TF32 off, as the reference does.
STAGED: tuple[tuple[float, Precision], ...] = (
    (0.7, Precision(torch.bfloat16)),
    (0.96875, Precision(torch.float32, tf32=True)),
    (1.0, Precision(torch.float32)),
)

_FIXED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str, *, tf32: bool, max_r_over_t: float) -> Precision:
    """The precision of a training step whose pairs reach r/t ≤ `max_r_over_t`, for `TrainConfig.precision`.

    "fp32", "bf16", "fp16": that autocast dtype throughout. "staged": the cheapest entry of STAGED that covers
    `max_r_over_t` (the largest r/t of the current ECT stage or iCT grid; 0 for diffusion). "auto": "staged" on
    CUDA, "fp32" on the CPU (where autocast saves little and TF32 does not exist). `tf32` (TrainConfig.tf32) turns
    TF32 on for all fp32 work as well.
    """
    device = torch.device(device)
    if precision == "auto":
        precision = "staged" if device.type == "cuda" else "fp32"
    if precision == "staged":
        chosen = next(p for limit, p in STAGED if max_r_over_t <= limit)
    elif precision in _FIXED:
        chosen = Precision(_FIXED[precision])
    else:
        raise ValueError(f"--train.precision must be auto, staged, fp32, bf16 or fp16, got {precision!r}")
    return Precision(chosen.dtype, tf32=chosen.tf32 or tf32)


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


def replace_precond(model: Precond, *, net: nn.Module | None = None, sigma_min_shift: float | None = None,
                    compute_dtype: torch.dtype | None = None) -> Precond:
    """A Precond sharing `model`'s network and settings, with `net` (e.g. a compiled view of the same network), the
    boundary σ_min and/or the compute dtype replaced (None keeps `model`'s). No weights are copied."""
    return Precond(
        model.net if net is None else net,
        sigma_data=model.sigma_data,
        sigma_min_shift=model.sigma_min_shift if sigma_min_shift is None else sigma_min_shift,
        label_dim=model.label_dim,
        compute_dtype=model.compute_dtype if compute_dtype is None else compute_dtype,
    )
