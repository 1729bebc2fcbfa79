"""Pure schedule functions: noise-level sampling, the ECT mapping r(t), iCT discretisation and curriculum, LR.

Every function here is a pure function of its arguments (progress is passed in as images seen), so resuming
a run can never desynchronise a schedule. Equation numbers refer to "Consistency Models Made Easy".
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor


def lognormal_t(z: Tensor, *, P_mean: float, P_std: float) -> Tensor:
    """t ~ LogNormal(P_mean, P_std) from standard-normal draws z: t = exp(P_mean + P_std·z)."""
    return torch.exp(P_mean + P_std * z)


def ect_stage(nimg: int, stage_nimg: float, *, from_scratch: bool = False) -> int:
    """Stage a of the ECT schedule after `nimg` training images (d = stage_nimg images per stage).

    Tuning from a pretrained diffusion model starts at a = 1 (the reference code's ⌊nimg/d⌋ + 1, i.e. the
    paper's ⌈iters/d⌉ without the pure-diffusion stage); from scratch a = ⌊nimg/d⌋, so stage 0 (r ≡ 0) is
    diffusion pretraining.
    """
    if stage_nimg <= 0:
        raise ValueError(f"stage length d must be positive, got {stage_nimg}")
    a = int(nimg // stage_nimg)
    return a if from_scratch else a + 1


def ect_n(t: Tensor, *, k: float = 8.0, b: float = 1.0) -> Tensor:
    """The sigmoid mapping's n(t) = 1 + k·sigmoid(−b·t) (Eq. 18)."""
    return 1.0 + k * torch.sigmoid(-b * t)


def ect_r(
    t: Tensor,
    stage: int,
    *,
    q: float,
    k: float = 8.0,
    b: float = 1.0,
    mapping: Literal["sigmoid", "const"] = "sigmoid",
) -> Tensor:
    """ECT's r(t) = max(t·(1 − n(t)/q^a), 0) (Eq. 15 with Eq. 17 "const" n ≡ 1 or Eq. 18 "sigmoid").

    Stage a = 0 gives r ≡ 0 (diffusion pretraining); as a grows, r → t and Δt = t − r → 0.
    """
    if stage <= 0:
        return torch.zeros_like(t)
    if mapping == "sigmoid":
        n = ect_n(t, k=k, b=b)
    elif mapping == "const":
        n = torch.ones_like(t)
    else:
        raise ValueError(f"unknown ECT mapping {mapping!r}; expected 'sigmoid' or 'const'")
    return (t * (1.0 - n / (q**stage))).clamp_min(0.0)


def ect_max_r_over_t(
    stage: int, *, q: float, k: float = 8.0, b: float = 1.0, mapping: Literal["sigmoid", "const"] = "sigmoid"
) -> float:
    """The largest r/t of stage a over all t: 1 − inf_t n(t)/q^a, clamped at 0 (Eq. 15, 17, 18).

    The sigmoid mapping's n(t) = 1 + k·sigmoid(−b·t) falls toward 1 as t grows (b > 0), so the bound is 1 − 1/q^a,
    approached by the largest t; rows at small t have r/t down to 1 − (1 + k/2)/q^a.
    """
    if stage <= 0:
        return 0.0
    if mapping == "sigmoid":
        n_inf = 1.0 + k * (0.0 if b > 0 else 0.5 if b == 0 else 1.0)
    elif mapping == "const":
        n_inf = 1.0
    else:
        raise ValueError(f"unknown ECT mapping {mapping!r}; expected 'sigmoid' or 'const'")
    return max(1.0 - n_inf / q**stage, 0.0)


def karras_sigmas(
    n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Karras et al. (2022) discretisation, descending from σ_max to σ_min (n ≥ 2 points):
    t_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 points, got {n}")
    i = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / rho
    s = (sigma_max**inv + i / (n - 1) * (sigma_min**inv - sigma_max**inv)) ** rho
    return s.to(dtype)


def heun_sigmas(num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's Heun grid (App. C): `num_steps` Karras times from σ_max to σ_min, then 0 (float64)."""
    return torch.cat([karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho),
                      torch.zeros(1, dtype=torch.float64)])


def consistency_sigmas(steps: int, *, t_max: float = 80.0, mid_t: Sequence[float] = (0.821,)) -> Tensor:
    """Times of `steps`-step consistency sampling (REFERENCE §5): t_max, then the first steps − 1 of `mid_t`."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if len(mid_t) < steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} intermediate time(s) (--mid-t), got {len(mid_t)}: {list(mid_t)}")
    return torch.tensor([t_max, *mid_t[: steps - 1]], dtype=torch.float64)


def ict_num_steps(step: int, total_steps: int, *, s0: int = 10, s1: int = 1280) -> int:
    """iCT curriculum N(m) = min(s0·2^⌊m/M'⌋, s1) + 1 with M' = ⌊M / log2(⌊s1/s0⌋ + 1)⌋ (Eq. 10)."""
    m_prime = math.floor(total_steps / math.log2(math.floor(s1 / s0) + 1))
    m_prime = max(m_prime, 1)
    return min(s0 * 2 ** (step // m_prime), s1) + 1


def ict_interval_probs(sigmas_asc: Tensor, *, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """iCT's discrete lognormal p(i) ∝ erf((ln t_{i+1} − P_mean)/(√2 P_std)) − erf((ln t_i − P_mean)/(√2 P_std))
    over the N − 1 intervals [t_i, t_{i+1}] of an ascending grid."""
    e = torch.erf((torch.log(sigmas_asc.double()) - P_mean) / (math.sqrt(2.0) * P_std))
    w = e[1:] - e[:-1]
    return w / w.sum()


def ict_t_r(
    u: Tensor, num_points: int, *, sigma_min: float, sigma_max: float, rho: float, P_mean: float, P_std: float
) -> tuple[Tensor, Tensor]:
    """Draw iCT pairs (t, r) = (t_{i+1}, t_i) from uniform draws u ∈ [0, 1) by inverting the CDF of p(i)."""
    grid = karras_sigmas(num_points, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).flip(0)
    cdf = torch.cumsum(ict_interval_probs(grid, P_mean=P_mean, P_std=P_std), 0).to(u.device)
    i = torch.searchsorted(cdf, u.double(), right=True).clamp_max(num_points - 2)
    grid = grid.to(u.device)
    return grid[i + 1].to(u.dtype), grid[i].to(u.dtype)


def learning_rate(
    nimg: float,
    *,
    lr: float,
    schedule: Literal["const", "invsqrt"] = "const",
    t_ref_nimg: float = 256_000.0,
    warmup_nimg: float = 0.0,
) -> float:
    """Learning rate after `nimg` images: constant, or α_ref/√max(nimg/t_ref, 1) (EDM2), with linear warm-up."""
    if schedule == "invsqrt":
        lr = lr / math.sqrt(max(nimg / t_ref_nimg, 1.0))
    elif schedule != "const":
        raise ValueError(f"unknown LR schedule {schedule!r}; expected 'const' or 'invsqrt'")
    if warmup_nimg > 0:
        lr *= min(nimg / warmup_nimg, 1.0)
    return lr
