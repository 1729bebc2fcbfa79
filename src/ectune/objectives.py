"""The training objective: which pairs (t, r) a step draws and how their Δ is weighted (REFERENCE §2–4).

Diffusion pretraining (r = 0), ECT and the iCT baseline share one consistency loss (ectune.losses) and differ only
here: ECT's stages a and stage length d (Eq. 15–18), iCT's discretisation curriculum N(m) (Eq. 10) and its
pseudo-Huber c, and the loss spec each hands to the loss. Every function is pure in (config, images seen, total
images), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from .config import ObjectiveConfig, WeightingName
from .schedules import ect_max_r_over_t, ect_r, ect_stage, ict_num_steps, ict_t_r, karras_sigmas, lognormal_t
from .weighting import LossForm


@dataclass(frozen=True)
class LossSpec:
    """How a pair's Δ = f(x_t, t) − sg[f(x_r, r)] becomes its loss: w̄(t, r) (`weighting`, Tab. 3) times the adaptive
    loss of Δ with power `p` and constant `c` (Eq. 16, 19, 20) in `metric`, entering as `form`
    (ectune.weighting.adaptive_loss). The defaults are ECT's CIFAR-10 setting."""

    weighting: WeightingName = "inv_dt"
    p: float = 0.5
    c: float = 0.0
    metric: Literal["l2", "l1"] = "l2"
    form: LossForm = "pseudo_huber"
    sigma_data: float = 0.5


def loss_spec(obj: ObjectiveConfig, *, data_dim: int, sigma_data: float) -> LossSpec:
    """The objective's loss spec. iCT sets the pseudo-Huber c from the data dimension d: c = 0.00054·√d (REFERENCE §4)."""
    c = obj.ict_c_scale * data_dim**0.5 if obj.kind == "ict" else obj.c
    return LossSpec(weighting=obj.weighting, p=obj.p, c=c, metric=obj.metric, form=obj.loss_form, sigma_data=sigma_data)


def ict_objective(ect: ObjectiveConfig) -> ObjectiveConfig:
    """The iCT baseline with the same noise distribution (REFERENCE §4): 1/(t_{i+1} − t_i), pseudo-Huber."""
    return replace(ect, kind="ict", weighting="inv_dt", p=0.5, metric="l2")


def stage_nimg(obj: ObjectiveConfig, total_nimg: float) -> float:
    """ECT stage length d in images: `stage_kimg` if set, else total / stages (CIFAR-10: /8, ImageNet-64: /4)."""
    return obj.stage_kimg * 1000 if obj.stage_kimg > 0 else total_nimg / obj.stages


def last_stage_start(obj: ObjectiveConfig, *, total_nimg: float) -> int:
    """The first image count in the last ECT stage that a run of `total_nimg` images reaches: ⌈(n − 1)·d⌉ for its n
    stages (`stages`, or ⌈total/d⌉ when d is `stage_kimg`). Rounded up: ⌊(n − 1)·d⌋ can still fall in the stage
    before when d is not whole."""
    d = stage_nimg(obj, total_nimg)
    stages = obj.stages if obj.stage_kimg <= 0 else math.ceil(total_nimg / d)
    return math.ceil((stages - 1) * d)


def stage(obj: ObjectiveConfig, *, nimg: int, total_nimg: float) -> int:
    """ECT's stage a at progress `nimg` (ectune.schedules.ect_stage); 0 for the objectives without stages."""
    if obj.kind != "ect":
        return 0
    return ect_stage(nimg, stage_nimg(obj, total_nimg), from_scratch=obj.from_scratch)


def ict_points(obj: ObjectiveConfig, *, nimg: int, total_nimg: float) -> int:
    """iCT's number of discretisation points at progress `nimg`: the curriculum N(m), or `ict_fixed_n` if set."""
    return obj.ict_fixed_n or ict_num_steps(int(nimg), int(total_nimg), s0=obj.ict_s0, s1=obj.ict_s1)


def draw_t_r(
    obj: ObjectiveConfig, *, n: int, nimg: int, total_nimg: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw the training pairs (t, r) [n] (CPU, fp32) for the objective at progress `nimg` images."""
    if obj.kind == "ict":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        t, r = ict_t_r(u, ict_points(obj, nimg=nimg, total_nimg=total_nimg), sigma_min=obj.sigma_min,
                       sigma_max=obj.sigma_max, rho=obj.rho, P_mean=obj.P_mean, P_std=obj.P_std)
        return t.float(), r.float()
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    t = lognormal_t(z, P_mean=obj.P_mean, P_std=obj.P_std).float()  # r is computed from the t actually used
    if obj.kind == "diffusion":
        return t, torch.zeros(n)
    if obj.kind != "ect":
        raise ValueError(f"unknown objective {obj.kind!r}; expected 'diffusion', 'ect' or 'ict'")
    a = stage(obj, nimg=nimg, total_nimg=total_nimg)
    r = ect_r(t.double(), a, q=obj.q, k=obj.k, b=obj.b, mapping=obj.mapping)
    return t, r.float()


def largest_r_over_t(obj: ObjectiveConfig, *, nimg: int, total_nimg: float) -> float:
    """The largest r/t any pair drawn at progress `nimg` can have (0 for diffusion): what decides how much precision
    the step needs, since Δ's rounding noise grows as r/t → 1 (see ectune.precond.resolve_precision)."""
    if obj.kind == "diffusion":
        return 0.0
    if obj.kind == "ict":
        grid = karras_sigmas(ict_points(obj, nimg=nimg, total_nimg=total_nimg), sigma_min=obj.sigma_min,
                             sigma_max=obj.sigma_max, rho=obj.rho)
        return float((grid[1:] / grid[:-1]).max())  # descending grid: (r, t) = (t_{i+1}, t_i)
    a = stage(obj, nimg=nimg, total_nimg=total_nimg)
    return ect_max_r_over_t(a, q=obj.q, k=obj.k, b=obj.b, mapping=obj.mapping)
