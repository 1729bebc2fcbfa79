"""Per-sample training losses. Diffusion pretraining, ECT and iCT share one consistency loss and differ only
in how the pair (t, r) is drawn (REFERENCE §2–4):

    x_t = x_0 + t·ε,  x_r = x_0 + r·ε  (one shared ε)
    Δ   = f_θ(x_t, t) − sg[f_θ(x_r, r)]          (target: same weights, no grad, same dropout mask)
    L   = w̄(t, r) · (√(‖Δ‖²₂ + c²) − c)          (p = 1/2: pseudo-Huber, gradient w̄·w(Δ)·Δ, Eq. 16/19/20)
    L   = w̄(t, r) · ‖Δ‖²₂                        (p = 0: squared L2, EDM's diffusion loss)

(other p and the L1 weighting: see ectune.weighting.adaptive_loss, whose `form` also offers w̄·sg[w(Δ)]·‖Δ‖²).

Rows with r = 0 take x_0 as the target (f(x, 0) = x) without running the network; with r ≡ 0 this is
exactly denoising-diffusion training (Eq. 14).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import ObjectiveConfig
from .nets.dropout import MaskTape, masks_recorded, masks_replayed
from .schedules import ect_max_r_over_t, ect_r, ect_stage, ict_num_steps, ict_t_r, karras_sigmas, lognormal_t
from .weighting import LossForm, adaptive_loss, timestep_weight

Denoiser = Callable[..., Tensor]  # f(x, sigma, class_labels, *, dropout_key) -> fp32 tensor like x


def consistency_loss(
    f: Denoiser,
    x0: Tensor,
    t: Tensor,
    r: Tensor,
    eps: Tensor,
    *,
    class_labels: Tensor | None = None,
    dropout_key: Tensor | None = None,
    weighting: str = "inv_dt",
    p: float = 0.5,
    c: float = 0.0,
    metric: str = "l2",
    loss_form: LossForm = "pseudo_huber",
    sigma_data: float = 0.5,
    row_multiple: int = 1,
    target_f: Denoiser | None = None,
) -> Tensor:
    """The per-sample loss [N] for data x0 [N,C,H,W], times t, r [N] (0 ≤ r < t) and noise eps like x0.

    t and r may live on the CPU while x0 lives on a GPU: the rows that need a target pass are then found on the
    host, so the step never waits for the device. `row_multiple` rounds the number of target rows up (padding
    with r = 0 rows whose outputs are discarded) so a compiled network sees few distinct batch sizes.
    `target_f` runs the target pass when the student's f is a wrapper that must not see it (e.g. DDP); it must
    compute the same function with the same weights.
    """
    target_f = f if target_f is None else target_f
    device = x0.device
    n = x0.shape[0]
    if dropout_key is None:
        # Both passes must share one mask: keys make the mask a function of the row, not of the RNG stream.
        dropout_key = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64, device=device)
    dropout_key = dropout_key.to(device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    rows = target_rows(r, row_multiple)
    t_dev, r_dev = t.to(device, torch.float32), r.to(device, torch.float32)
    bcast = (-1,) + (1,) * (x0.ndim - 1)

    # The student pass runs first so that the target pass can replay its dropout masks (rows of them) rather
    # than hash them again; both ways give the same masks (ectune.nets.dropout).
    tape = MaskTape()
    with masks_recorded(tape):
        student = f(x0 + t_dev.reshape(bcast) * eps, t_dev, class_labels, dropout_key=dropout_key)
    target = x0
    if rows is not None:
        with torch.no_grad():
            if rows.numel() == n:
                with masks_replayed(tape, slice(None)):
                    target = target_f(x0 + r_dev.reshape(bcast) * eps, r_dev, class_labels, dropout_key=dropout_key)
            else:
                rows = rows.to(device)
                with masks_replayed(tape, rows):
                    sub = target_f(
                        x0[rows] + r_dev[rows].reshape(bcast) * eps[rows],
                        r_dev[rows],
                        None if class_labels is None else class_labels[rows],
                        dropout_key=dropout_key[rows],
                    )
                target = x0.index_copy(0, rows, sub)
            # Padding rows (r = 0) and any r = 0 row inside a full pass take the exact boundary value x_0.
            target = torch.where(r_dev.reshape(bcast) > 0, target, x0).detach()

    delta = student - target
    w_bar = timestep_weight(weighting, t_dev, r_dev, sigma_data=sigma_data)
    return w_bar * adaptive_loss(delta, p=p, c=c, metric=metric, form=loss_form)


def target_rows(r: Tensor, row_multiple: int) -> Tensor | None:
    """Indices of the rows whose target needs the network (r > 0), padded to a multiple; None if there are none."""
    need = r > 0
    rows = need.nonzero().flatten()
    m = rows.numel()
    if m == 0:
        return None
    padded = min(-(-m // row_multiple) * row_multiple, r.numel())
    if padded > m:
        rows = torch.cat([rows, (~need).nonzero().flatten()[: padded - m]]).sort().values
    return rows


def stage_nimg(obj: ObjectiveConfig, total_nimg: float) -> float:
    """ECT stage length d in images: `stage_kimg` if set, else total / stages (CIFAR-10: /8, ImageNet-64: /4)."""
    return obj.stage_kimg * 1000 if obj.stage_kimg > 0 else total_nimg / obj.stages


def draw_t_r(
    obj: ObjectiveConfig, *, n: int, nimg: int, total_nimg: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw the training pairs (t, r) [n] (CPU, fp32) for the objective at progress `nimg` images."""
    if obj.kind == "ict":
        num_points = obj.ict_fixed_n or ict_num_steps(int(nimg), int(total_nimg), s0=obj.ict_s0, s1=obj.ict_s1)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        t, r = ict_t_r(
            u, num_points, sigma_min=obj.sigma_min, sigma_max=obj.sigma_max, rho=obj.rho, P_mean=obj.P_mean, P_std=obj.P_std
        )
        return t.float(), r.float()
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    t = lognormal_t(z, P_mean=obj.P_mean, P_std=obj.P_std).float()  # r is computed from the t actually used
    if obj.kind == "diffusion":
        return t, torch.zeros(n)
    if obj.kind != "ect":
        raise ValueError(f"unknown objective {obj.kind!r}; expected 'diffusion', 'ect' or 'ict'")
    a = ect_stage(nimg, stage_nimg(obj, total_nimg), from_scratch=obj.from_scratch)
    r = ect_r(t.double(), a, q=obj.q, k=obj.k, b=obj.b, mapping=obj.mapping)
    return t, r.float()


def largest_r_over_t(obj: ObjectiveConfig, *, nimg: int, total_nimg: float) -> float:
    """The largest r/t any pair drawn at progress `nimg` can have (0 for diffusion): what decides how much precision
    the step needs, since Δ's rounding noise grows as r/t → 1 (see ectune.precond.resolve_precision)."""
    if obj.kind == "diffusion":
        return 0.0
    if obj.kind == "ict":
        num_points = obj.ict_fixed_n or ict_num_steps(int(nimg), int(total_nimg), s0=obj.ict_s0, s1=obj.ict_s1)
        grid = karras_sigmas(num_points, sigma_min=obj.sigma_min, sigma_max=obj.sigma_max, rho=obj.rho)
        return float((grid[1:] / grid[:-1]).max())  # descending grid: (r, t) = (t_{i+1}, t_i)
    a = ect_stage(nimg, stage_nimg(obj, total_nimg), from_scratch=obj.from_scratch)
    return ect_max_r_over_t(a, q=obj.q, k=obj.k, b=obj.b, mapping=obj.mapping)


def objective_loss_kwargs(obj: ObjectiveConfig, *, data_dim: int, sigma_data: float) -> dict:
    """Keyword arguments of `consistency_loss` for an objective (iCT's pseudo-Huber c = 0.00054·√d)."""
    c = obj.ict_c_scale * data_dim**0.5 if obj.kind == "ict" else obj.c
    return dict(weighting=obj.weighting, p=obj.p, c=c, metric=obj.metric, loss_form=obj.loss_form, sigma_data=sigma_data)
