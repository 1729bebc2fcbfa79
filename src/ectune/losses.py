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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .nets.dropout import MaskTape, masks_recorded, masks_replayed
from .objectives import LossSpec
from .weighting import adaptive_loss, timestep_weight

Denoiser = Callable[..., Tensor]  # f(x, sigma, class_labels, *, dropout_key) -> fp32 tensor like x


@dataclass(frozen=True)
class Passes:
    """f_θ as a training step runs it, where one callable will not do: `student` runs the pass with gradients (a DDP
    wrapper, say), `target` the no-grad pass with the same weights (without DDP's gradient hooks), on its r > 0 rows
    padded with r = 0 rows to a multiple of `row_multiple` (so a compiled target sees few batch sizes; the padding
    rows' outputs are discarded)."""

    student: Denoiser
    target: Denoiser
    row_multiple: int = 1


def consistency_loss(
    f: Denoiser | Passes,
    x0: Tensor,
    t: Tensor,
    r: Tensor,
    eps: Tensor,
    *,
    spec: LossSpec = LossSpec(),
    class_labels: Tensor | None = None,
    dropout_key: Tensor | None = None,
) -> Tensor:
    """The per-sample loss [N] for data x0 [N,C,H,W], times t, r [N] (0 ≤ r < t) and noise eps like x0.

    t and r may live on the CPU while x0 lives on a GPU: the rows that need a target pass are then found on the
    host, so the step never waits for the device.
    """
    passes = f if isinstance(f, Passes) else Passes(f, f)
    device = x0.device
    n = x0.shape[0]
    if dropout_key is None:
        # Both passes must share one mask: keys make the mask a function of the row, not of the RNG stream.
        dropout_key = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64, device=device)
    dropout_key = dropout_key.to(device)
    if class_labels is not None:
        class_labels = class_labels.to(device)
    rows = target_rows(r, passes.row_multiple)
    t_dev, r_dev = t.to(device, torch.float32), r.to(device, torch.float32)
    bcast = (-1,) + (1,) * (x0.ndim - 1)

    # The student pass runs first so that the target pass can replay its dropout masks (rows of them) rather
    # than hash them again; both ways give the same masks (ectune.nets.dropout).
    tape = MaskTape()
    with masks_recorded(tape):
        student = passes.student(x0 + t_dev.reshape(bcast) * eps, t_dev, class_labels, dropout_key=dropout_key)
    target = x0
    if rows is not None:
        with torch.no_grad():
            if rows.numel() == n:
                with masks_replayed(tape, slice(None)):
                    target = passes.target(x0 + r_dev.reshape(bcast) * eps, r_dev, class_labels, dropout_key=dropout_key)
            else:
                rows = rows.to(device)
                with masks_replayed(tape, rows):
                    sub = passes.target(
                        x0[rows] + r_dev[rows].reshape(bcast) * eps[rows],
                        r_dev[rows],
                        None if class_labels is None else class_labels[rows],
                        dropout_key=dropout_key[rows],
                    )
                target = x0.index_copy(0, rows, sub)
            # Padding rows (r = 0) and any r = 0 row inside a full pass take the exact boundary value x_0.
            target = torch.where(r_dev.reshape(bcast) > 0, target, x0).detach()

    delta = student - target
    w_bar = timestep_weight(spec.weighting, t_dev, r_dev, sigma_data=spec.sigma_data)
    return w_bar * adaptive_loss(delta, p=spec.p, c=spec.c, metric=spec.metric, form=spec.form)


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
