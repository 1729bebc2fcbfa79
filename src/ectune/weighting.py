"""Loss weightings: the timestep weightings w̄(t, r) of Tab. 3, the adaptive weighting w(Δ) (Eq. 16) and the
per-sample metric it weights (`adaptive_loss`).

The per-sample ECT loss is w̄(t, r) · adaptive_loss(Δ): with the default form its gradient is
w̄ · w(Δ) · Δ · ∂Δ, the differential w(Δ) · d(½‖Δ‖²) of Eq. 20, which for p = 1/2 is the pseudo-Huber
metric √(‖Δ‖² + c²) − c that the reference code minimises.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

_TIMESTEP_WEIGHTINGS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "one": lambda t, r, sd: torch.ones_like(t),
    "inv_t": lambda t, r, sd: 1.0 / t,
    "inv_dt": lambda t, r, sd: 1.0 / (t - r),
    "inv_t_plus_inv_sigma_data": lambda t, r, sd: 1.0 / t + 1.0 / sd,
    "inv_t2": lambda t, r, sd: 1.0 / t**2,
    "inv_t2_plus_1": lambda t, r, sd: 1.0 / t**2 + 1.0,
    "inv_t2_plus_inv_sigma_data2": lambda t, r, sd: 1.0 / t**2 + 1.0 / sd**2,
    "inv_t2_plus_sigma_data2": lambda t, r, sd: 1.0 / (t**2 + sd**2),
    # EDM's λ(t) = (t² + σ_d²)/(t·σ_d)², which is algebraically SNR(t) + 1/σ_d² (REFERENCE §2).
    "edm": lambda t, r, sd: (t**2 + sd**2) / (t * sd) ** 2,
}

TIMESTEP_WEIGHTINGS: tuple[str, ...] = tuple(_TIMESTEP_WEIGHTINGS)


def timestep_weight(name: str, t: Tensor, r: Tensor, *, sigma_data: float = 0.5) -> Tensor:
    """w̄(t, r) by name (Tab. 3): one, inv_t, inv_dt = 1/(t−r), inv_t_plus_inv_sigma_data, inv_t2,
    inv_t2_plus_1, inv_t2_plus_inv_sigma_data2, inv_t2_plus_sigma_data2, and edm."""
    try:
        fn = _TIMESTEP_WEIGHTINGS[name]
    except KeyError:
        raise ValueError(f"unknown timestep weighting {name!r}; expected one of {', '.join(TIMESTEP_WEIGHTINGS)}") from None
    return fn(t, r, sigma_data)


def adaptive_weight(delta: Tensor, *, p: float, c: float, metric: Literal["l2", "l1"] = "l2") -> Tensor:
    """w(Δ) per sample, detached: 1/(‖Δ‖²₂ + c²)^p (Eq. 16), or 1/(‖Δ‖₁ + c) for the L1 variant (Tab. 4).

    delta: [N, ...]; returns [N]. p = 0 gives plain squared L2 (w ≡ 1). With p = 1/2 the loss
    w(Δ)·‖Δ‖² has twice the gradient of the pseudo-Huber metric √(‖Δ‖²+c²) − c (Eq. 19–20); `adaptive_loss`
    gives the metric itself.
    """
    d = delta.detach().flatten(1).float()
    if metric == "l2":
        if p == 0.0:
            return torch.ones(d.shape[0], device=d.device)
        # The clamp keeps c = 0 finite at Δ = 0, where the weighted loss is 0 whatever w is.
        return (d.square().sum(1) + c**2).clamp_min(1e-20).pow(-p)
    if metric == "l1":
        return 1.0 / (d.abs().sum(1) + c).clamp_min(1e-20)
    raise ValueError(f"unknown adaptive-weighting metric {metric!r}; expected 'l2' or 'l1'")


LossForm = Literal["pseudo_huber", "weighted_l2"]
LOSS_FORMS: tuple[str, ...] = ("pseudo_huber", "weighted_l2")


def adaptive_loss(
    delta: Tensor, *, p: float, c: float, metric: Literal["l2", "l1"] = "l2", form: LossForm = "pseudo_huber"
) -> Tensor:
    """The per-sample metric of Δ [N, ...] that the timestep weighting multiplies; returns [N] (fp32, with gradient).

    p = 0 with the L2 metric is no adaptive weighting: the squared L2 ‖Δ‖² of diffusion training (Eq. 14; EDM's
    loss, gradient 2·Δ), in either form. Otherwise, by `form`:
      "pseudo_huber" (default): the gradient is w(Δ)·Δ, the differential w(Δ)·d(½‖Δ‖²) of Eq. 20. With p = 1/2 this
        is the pseudo-Huber metric √(‖Δ‖² + c²) − c (Eq. 19), the loss the reference code minimises, so the
        loss value and the gradient scale (which sets RAdam's and Adam's first updates) are the reference's. Other p
        and the L1 weighting 1/(‖Δ‖₁ + c) (Tab. 4) use sg[w(Δ)]·½‖Δ‖², which has that gradient; its value is not a
        metric (for L1 no function of Δ has that gradient: the field Δ/(‖Δ‖₁ + c) is not conservative).
      "weighted_l2": sg[w(Δ)]·‖Δ‖², Eq. 16 read literally: twice the gradient of "pseudo_huber".
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"unknown loss form {form!r}; expected one of {', '.join(LOSS_FORMS)}")
    d = delta.float().flatten(1)
    sq = d.square().sum(1)
    if metric == "l2" and p == 0.0:
        return sq
    if form == "weighted_l2":
        return adaptive_weight(delta, p=p, c=c, metric=metric) * sq
    if metric == "l2" and p == 0.5:
        # Eq. 19, √(‖Δ‖² + c²) − c written as ‖Δ‖²/(√(‖Δ‖² + c²) + c): no cancellation when ‖Δ‖ ≪ c. Its gradient
        # is Δ/√(‖Δ‖² + c²); the clamp keeps it finite where Δ = 0 and c = 0.
        return sq / ((sq + c**2).clamp_min(1e-20).sqrt() + c)
    return adaptive_weight(delta, p=p, c=c, metric=metric) * (0.5 * sq)  # Eq. 20
