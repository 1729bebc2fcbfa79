"""One optimiser step: draw the step's randomness from (seed, images seen), run the consistency loss over the
global batch (split into accumulation rounds and ranks), and apply the update unless something is non-finite.

Every random draw of the step at `nimg` is a function of (seed, nimg) alone, so a resumed run is bit-identical to
an uninterrupted one and the result does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import ImageDataset, global_indices, to_model_input, xflip_mask
from ..guidance import GuidedDenoiser
from ..losses import consistency_loss
from ..objectives import LossSpec, draw_t_r, largest_r_over_t
from ..precond import Precision, resolve_precision
from ..runtime import distributed as rt_dist
from ..runtime.precision import set_cuda_tf32
from ..schedules import learning_rate
from .guard import StepFlag, step_unless_nonfinite

if TYPE_CHECKING:
    from .fastpath import FastPath


@dataclass(frozen=True)
class StepResult:
    """loss_sum: this rank's summed per-sample loss (0 for a skipped step); r_over_t: the batch's mean r/t;
    kept: whether the update was applied (bool() of it waits only for the finiteness check)."""

    loss_sum: Tensor
    r_over_t: float
    kept: StepFlag


def step_generator(seed: int, nimg: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw of the step that starts at `nimg` images."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + nimg * 0x85EBCA77 + 0x27D4EB2F) % (2**63 - 1))
    return g


def training_step(
    *, fast: FastPath, opt: torch.optim.Optimizer, data: ImageDataset, cfg: RunConfig, spec: LossSpec, nimg: int,
    dist: rt_dist.Dist, guide: nn.Module | None = None,
) -> StepResult:
    """One optimiser step on the global batch that starts at `nimg`. A skipped step leaves weights and optimiser
    state unchanged. With --objective.target-guidance w ≠ 1 the target pass is the guided teacher
    f_g + w·(f − f_g) (ectune.guidance), f_g being `guide` or, without one, f under the unconditional label."""
    device, world = fast.device, dist.world_size
    B, accum = cfg.train.batch, cfg.train.accum
    per_round = B // (accum * world)
    g = step_generator(cfg.train.seed, nimg)
    t, r = draw_t_r(cfg.objective, n=B, nimg=nimg, total_nimg=cfg.train.total_kimg * 1000, generator=g)  # on the host
    keys = torch.randint(0, 2**31 - 1, (B,), generator=g)
    indices = global_indices(len(data), seed=cfg.train.seed, start=nimg, count=B)
    positions = torch.arange(nimg, nimg + B)  # each image seen's own stream: flips, latent posterior draws
    flips = xflip_mask(positions, seed=cfg.train.seed)
    eps = torch.randn((B, *cfg.net.image_shape), generator=step_generator(cfg.train.seed, nimg, device), device=device)

    apply_step_precision(fast.model, cfg, nimg=nimg, device=device)
    passes, guard = fast.passes(), fast.step_guard(opt)
    if cfg.objective.target_guidance != 1.0:
        teacher = GuidedDenoiser(passes.target, weight=cfg.objective.target_guidance, guide=guide,
                                 label_dim=cfg.net.label_dim)
        passes = dataclasses.replace(passes, target=teacher)
    if guard is not None:
        guard.zero_grads()
    else:
        opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for rnd in range(accum):
        rows = slice((rnd * world + dist.rank) * per_round, (rnd * world + dist.rank + 1) * per_round)
        images, labels = fast.load_rows(data, indices[rows], positions=positions[rows], seed=cfg.train.seed)
        x0 = to_model_input(images, device=device, xflip=cfg.data.xflip, flip_mask=flips[rows])
        with fast.no_sync(last_round=rnd == accum - 1):
            loss = consistency_loss(passes, x0, t[rows], r[rows], eps[rows], spec=spec, class_labels=labels,
                                    dropout_key=keys[rows])
            (loss.sum() / (per_round * accum)).backward()
        loss_sum += loss.detach().sum()
    r_over_t = float((r / t).mean())

    if guard is not None:  # decided on the device; no host sync
        kept = guard.step(opt, loss_sum, cfg.optim.grad_clip)
        return StepResult(torch.where(kept.tensor, loss_sum, torch.zeros_like(loss_sum)), r_over_t, kept)
    kept_now = _step_with_host_check(opt, fast.model.net, loss_sum, grad_clip=cfg.optim.grad_clip)
    return StepResult(loss_sum if kept_now else torch.zeros((), device=device), r_over_t,
                      StepFlag(torch.tensor(kept_now)))


def load_target_guide(cfg: RunConfig, model: nn.Module, device: torch.device) -> nn.Module | None:
    """The frozen guide model of a guided target (--objective.target-guide), or None; refuses a guided target that
    cannot be built (classifier-free guidance of an unconditional model, a guide for other data)."""
    obj = cfg.objective
    if obj.target_guidance == 1.0:
        return None
    if not obj.target_guide:
        if cfg.net.label_dim == 0:
            raise ValueError(f"--objective.target-guidance {obj.target_guidance} without --objective.target-guide is "
                             "classifier-free guidance, which needs a class-conditional model (--net.label-dim > 0); "
                             "name a weaker model with --objective.target-guide for autoguidance")
        return None
    from ..guidance import check_guide_matches
    from ..model import load_model

    guide, guide_cfg, _ = load_model(obj.target_guide, device=device)
    check_guide_matches(model, guide, model_shape=cfg.net.image_shape, guide_shape=guide_cfg.net.image_shape,
                        what=f"--objective.target-guide {obj.target_guide}")
    return guide.eval().requires_grad_(False)


def _step_with_host_check(opt: torch.optim.Optimizer, net: nn.Module, loss_sum: Tensor, *, grad_clip: float) -> bool:
    """Clip and apply the gradients unless the loss or a gradient is non-finite on any rank; undo an update that
    makes a weight non-finite. Returns whether the update was kept (the step's one host sync)."""
    params = [p for p in net.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads
                 else torch.zeros((), device=loss_sum.device))
    # Gradients are already all-reduced, losses are not: every rank must agree before skipping a step.
    bad = rt_dist.all_reduce_sum_((~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float())
    if bad.item() != 0:
        return False
    if grad_clip > 0:
        torch._foreach_mul_(grads, torch.clamp(grad_clip / (grad_norm + 1e-6), max=1.0))
    # Weights are equal on every rank after the all-reduce, so every rank keeps or undoes the step alike.
    return step_unless_nonfinite(opt, params)


def step_precision(cfg: RunConfig, nimg: int, device: torch.device) -> Precision:
    """The precision `resolve_precision` picks for the step at `nimg`: by the largest r/t its stage can draw."""
    max_r_over_t = largest_r_over_t(cfg.objective, nimg=nimg, total_nimg=cfg.train.total_kimg * 1000)
    return resolve_precision(cfg.train.precision, device, tf32=cfg.runtime.tf32, max_r_over_t=max_r_over_t)


def apply_step_precision(model: nn.Module, cfg: RunConfig, *, nimg: int, device: torch.device) -> None:
    """Run the step at `nimg` in `step_precision`. Under "auto" on CUDA ("staged") this changes at most twice per
    run, at the ECT stages where r/t gets too close to 1 for bf16 and then for TF32; a compiled f_θ compiles its
    two graphs again at each change."""
    p = step_precision(cfg, nimg, device)
    model.compute_dtype = p.dtype
    if device.type == "cuda":
        set_cuda_tf32(p.tf32)


def set_learning_rate(opt: torch.optim.Optimizer, cfg: RunConfig, nimg: int) -> float:
    o = cfg.optim
    lr = learning_rate(nimg, lr=o.lr, schedule=o.schedule, t_ref_nimg=o.t_ref_kimg * 1000, warmup_nimg=o.warmup_kimg * 1000)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, foreach=True)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                fused=device.type == "cuda")
    raise ValueError(f"unknown optimiser {o.name!r}; expected 'radam' or 'adam'")
