"""The training loop shared by diffusion pretraining, ECT tuning and the iCT baseline.

The objectives differ only in how (t, r) are drawn (see ectune.losses). Progress is counted in images;
every random draw of a step is a function of (seed, images seen), so a resumed run is bit-identical to an
uninterrupted one and the result does not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import ImageDataset, global_indices, load_batch, open_dataset, to_model_input, xflip_mask
from ..ema import EMA
from ..losses import consistency_loss, draw_t_r, largest_r_over_t, objective_loss_kwargs, stage_nimg, target_rows
from ..model import build_model, sample_images, sampling_boundary
from ..nets import count_params
from ..precond import Precision, Precond, replace_precond, resolve_precision
from ..runtime import distributed as rt_dist
from ..runtime.checkpoint import CheckpointError, load_state, save_model, save_state
from ..runtime.device import resolve_device
from ..runtime.perf import step_unless_nonfinite
from ..runtime.precision import set_cuda_tf32
from ..sampling import to_uint8
from ..schedules import ect_stage, learning_rate
from .report import Reporter
from .rundir import RunDir

if TYPE_CHECKING:
    from ..runtime.perf import StepFlag


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many consecutive non-finite steps)."""


@dataclass
class TrainResult:
    run_dir: Path
    nimg: int
    final_loss: float
    skipped_steps: int
    seconds: float


def step_generator(seed: int, nimg: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of every random draw of the step that starts at `nimg` images."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + nimg * 0x85EBCA77 + 0x27D4EB2F) % (2**63 - 1))
    return g


def _row_multiple(cfg: RunConfig) -> int:
    """Target-pass rows are padded to a multiple of 8 when compiling, so the compiled graph sees few batch sizes."""
    return 8 if cfg.runtime.compile else 1


def target_pass_rows(cfg: RunConfig, nimg: int) -> int:
    """Rows the target pass of the global step at `nimg` runs (the same draw and padding as `training_step`)."""
    _, r = draw_t_r(cfg.objective, n=cfg.train.batch, nimg=nimg, total_nimg=cfg.train.total_kimg * 1000,
                    generator=step_generator(cfg.train.seed, nimg))
    rows = target_rows(r, _row_multiple(cfg))
    return 0 if rows is None else rows.numel()


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "radam":
        return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, foreach=True)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                fused=device.type == "cuda")
    raise ValueError(f"unknown optimiser {o.name!r}; expected 'radam' or 'adam'")


def train(
    cfg: RunConfig,
    run_dir: Path | str,
    *,
    init: Path | str | None = None,
    command: str = "train",
    until_kimg: float | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train (or resume) the run in `run_dir` to cfg.train.total_kimg (or `until_kimg`, whichever is first)."""
    sampling_boundary(cfg)  # a bad sample.sigma_min_shift stops here, not at the first sample grid
    device = resolve_device(cfg.runtime.device)
    dist = rt_dist.init_distributed(device.type)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    _set_backend_flags(device)
    run = RunDir(Path(run_dir))
    cfg = run.prepare(cfg, init=init, command=command, is_main=dist.is_main)
    rt_dist.barrier()

    data = open_dataset(cfg.data)
    check_data_matches(cfg, data, world_size=dist.world_size)
    torch.manual_seed(cfg.train.seed)  # initial weights (all later randomness is per step, see step_generator)
    model = build_model(cfg).to(device)  # training_step sets the precision of each step's stage
    net = model.net  # the raw module: saved, averaged, normalised
    opt = make_optimizer(cfg, list(net.parameters()), device)
    ema = EMA(net, cfg.ema)
    nimg, skipped = restore(run, cfg, net, opt, ema, init, device)
    rt_dist.check_same_across_ranks(nimg, what=f"images seen in {run.state}")
    freeze_unused_parameters(net)
    train_model, target_model = _wrap_for_training(model, cfg, dist, device)

    total_nimg = int(cfg.train.total_kimg * 1000)
    stop_nimg = total_nimg if until_kimg is None else min(total_nimg, int(until_kimg * 1000))
    reporter = Reporter(run.root, total_kimg=stop_nimg / 1000, start_kimg=nimg / 1000, enabled=dist.is_main,
                        progress=show_progress)
    reporter.log(f"{command}: {count_params(net) / 1e6:.2f}M parameters, {len(data)} images ({data.description}), "
                 f"device {device}, {dist.world_size} process(es), starting at {nimg / 1000:.1f} kimg")
    ema_model = build_model(cfg).to(device).eval()
    loss_kwargs = objective_loss_kwargs(cfg.objective, data_dim=_data_dim(cfg), sigma_data=cfg.precond.sigma_data)
    meter = StatsMeter(device)
    t0 = time.time()
    next_status, next_save, next_sample, next_eval = (
        _next(nimg, k) for k in (cfg.runtime.status_kimg, cfg.runtime.save_kimg, cfg.runtime.sample_kimg, cfg.runtime.eval_kimg))
    bad_in_a_row = 0
    last_loss = math.nan
    last_save_nimg: int | None = None

    model.train()
    precision = None
    while nimg < stop_nimg:
        lr = set_learning_rate(opt, cfg, nimg)
        if (p := step_precision(cfg, nimg, device)) != precision:  # a stage changed the precision (and the speed)
            precision = p
            reporter.log(f"precision from {nimg / 1000:.1f} kimg: {_describe(p, device)}")
        loss_sum, r_over_t, finite = training_step(train_model, target_model, opt, data, cfg, nimg, dist, device, loss_kwargs)
        nimg += cfg.train.batch
        if finite:
            bad_in_a_row = 0
            net.normalize_weights_()  # EDM2's forced weight normalisation (no-op for DDPM++)
            ema.update(net, nimg=nimg, batch=cfg.train.batch)  # a skipped step leaves the averages alone too
        else:
            bad_in_a_row += 1
            skipped += 1
            if bad_in_a_row >= cfg.runtime.max_bad_steps:
                last = (f"the last save is {run.state} at {last_save_nimg / 1000:.3f} kimg" if last_save_nimg is not None
                        else "nothing was saved by this command")
                raise TrainingError(
                    f"{bad_in_a_row} consecutive steps had non-finite losses, gradients or updated weights at "
                    f"{nimg / 1000:.1f} kimg; stopping ({last}). Lower --optim.lr or check the data."
                )
        meter.add(loss_sum, cfg.train.batch, r_over_t)
        reporter.advance(min(nimg, stop_nimg) / 1000)

        done = nimg >= stop_nimg
        if nimg >= next_status or done:
            stats = meter.summary(dist)
            last_loss = stats["loss"]
            elapsed = time.time() - t0
            stage = _stage(cfg, nimg - cfg.train.batch, total_nimg)
            reporter.status(dict(
                kimg=nimg / 1000, loss=stats["loss"], stage=stage, mean_r_over_t=stats["r_over_t"], lr=lr,
                sec_per_kimg=elapsed / max(stats["count"] / 1000, 1e-9) / dist.world_size,
                img_per_s=stats["count"] * dist.world_size / max(elapsed, 1e-9), mem_gb=_memory_gb(device),
                skipped_steps=skipped,
            ))
            t0 = time.time()
            next_status = _next(nimg, cfg.runtime.status_kimg)
        if nimg >= next_save or done:
            save_checkpoint(run, cfg, net, opt, ema, nimg, skipped, is_main=dist.is_main)
            last_save_nimg, next_save = nimg, _next(nimg, cfg.runtime.save_kimg)
        if cfg.runtime.sample_kimg > 0 and (nimg >= next_sample or done):
            save_sample_grids(run, cfg, ema_model, ema, nimg, device, is_main=dist.is_main)
            next_sample = _next(nimg, cfg.runtime.sample_kimg)
        if cfg.runtime.eval_kimg > 0 and (nimg >= next_eval or done):
            from ..evaluation import evaluate_in_training

            ema_model.net.load_state_dict(ema.state_dict(0))
            record = evaluate_in_training(ema_model, cfg, data, nimg=nimg, device=device)  # all ranks take part
            if dist.is_main:
                reporter.metric(record)
            next_eval = _next(nimg, cfg.runtime.eval_kimg)

    reporter.close()
    rt_dist.barrier()
    if dist.is_main:
        run.release_lock()
    return TrainResult(run.root, nimg, last_loss, skipped, time.time() - t0)


def training_step(
    train_model: nn.Module,
    target_model: Precond,
    opt: torch.optim.Optimizer,
    data: ImageDataset,
    cfg: RunConfig,
    nimg: int,
    dist: rt_dist.Dist,
    device: torch.device,
    loss_kwargs: dict[str, Any],
    *,
    guard: str = "auto",
) -> tuple[Tensor, float, bool | StepFlag]:
    """One optimiser step on the global batch that starts at `nimg`; returns (loss sum on this rank, mean r/t, finite).

    `guard` picks how a step with a non-finite loss or gradient is skipped: "sync" reads the check on the host
    (one sync per step, the CPU default); "device" skips it on the device (`DeviceStepGuard`) and returns a
    `StepFlag`, whose bool() waits only for the check, not for the optimiser step (the single-process CUDA
    default); "auto" chooses. Either way a skipped step leaves weights and optimiser state unchanged and
    returns a zero loss sum.
    """
    B, accum, world = cfg.train.batch, cfg.train.accum, dist.world_size
    per_round = B // (accum * world)
    total_nimg = cfg.train.total_kimg * 1000
    mode = _guard_mode(guard, device, world)
    g = step_generator(cfg.train.seed, nimg)
    t, r = draw_t_r(cfg.objective, n=B, nimg=nimg, total_nimg=total_nimg, generator=g)  # host: no device sync
    keys = torch.randint(0, 2**31 - 1, (B,), generator=g)
    indices = global_indices(len(data), seed=cfg.train.seed, start=nimg, count=B)
    flips = xflip_mask(torch.arange(nimg, nimg + B), seed=cfg.train.seed)
    eps = torch.randn((B, *_img_shape(cfg)), generator=step_generator(cfg.train.seed, nimg, device), device=device)

    set_step_precision(target_model, cfg, nimg, device)
    student_f, target_f = train_model, target_model
    if cfg.runtime.compile and world == 1:  # under DDP only the network is compiled; its inputs are made inside f_θ
        student_f, target_f = with_batch_hint(train_model, dynamic=False), with_batch_hint(target_model, dynamic=True)
    step_guard = _step_guard(opt, target_model, device) if mode == "device" else None
    loss_sum = torch.zeros((), device=device)
    if step_guard is not None:
        step_guard.zero_grads()
    else:
        opt.zero_grad(set_to_none=True)
    for rnd in range(accum):
        rows = slice((rnd * world + dist.rank) * per_round, (rnd * world + dist.rank + 1) * per_round)
        images, labels = _load_rows(data, indices[rows], device)
        x0 = to_model_input(images, device=device, xflip=cfg.data.xflip, flip_mask=flips[rows])
        sync = contextlib.nullcontext() if rnd == accum - 1 or world == 1 else train_model.no_sync()
        with sync:
            loss = consistency_loss(
                student_f, x0, t[rows], r[rows], eps[rows],
                class_labels=labels, dropout_key=keys[rows],
                target_f=target_f, row_multiple=_row_multiple(cfg), **loss_kwargs,
            )
            (loss.sum() / (per_round * accum)).backward()
        loss_sum += loss.detach().sum()

    r_over_t = float((r / t).mean())
    if step_guard is not None:
        flag = step_guard.step(opt, loss_sum, cfg.optim.grad_clip)  # a StepFlag; no host sync
        return torch.where(flag.tensor, loss_sum, torch.zeros_like(loss_sum)), r_over_t, flag

    grads = [p.grad for p in target_model.net.parameters() if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros((), device=device)
    # Gradients are already all-reduced, losses are not: every rank must agree before skipping a step.
    bad = rt_dist.all_reduce_sum_((~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).float())
    finite = bool(bad.item() == 0)  # the step's one sync
    if finite:
        if cfg.optim.grad_clip > 0:
            torch._foreach_mul_(grads, torch.clamp(cfg.optim.grad_clip / (grad_norm + 1e-6), max=1.0))
        # Weights are equal on every rank after the all-reduce, so every rank keeps or undoes the step alike.
        finite = step_unless_nonfinite(opt, [p for p in target_model.net.parameters() if p.requires_grad])
    if not finite:
        loss_sum = torch.zeros((), device=device)
    return loss_sum, r_over_t, finite


def step_precision(cfg: RunConfig, nimg: int, device: torch.device) -> Precision:
    """The precision `resolve_precision` picks for the step at `nimg`: by the largest r/t its stage can draw."""
    max_r_over_t = largest_r_over_t(cfg.objective, nimg=nimg, total_nimg=cfg.train.total_kimg * 1000)
    return resolve_precision(cfg.train.precision, device, tf32=cfg.runtime.tf32, max_r_over_t=max_r_over_t)


def set_step_precision(target_model: nn.Module, cfg: RunConfig, nimg: int, device: torch.device) -> None:
    """Run the step at `nimg` in `step_precision`. Under "auto" on CUDA ("staged") this changes at most twice per
    run, at the ECT stages where r/t gets too close to 1 for bf16 and then for TF32; a compiled f_θ compiles its
    two graphs again at each change."""
    p = step_precision(cfg, nimg, device)
    precond = getattr(target_model, "_orig_mod", target_model)  # torch.compile's wrapper forwards reads, not writes
    precond.compute_dtype = p.dtype
    if device.type == "cuda":
        set_cuda_tf32(p.tf32)


def set_learning_rate(opt: torch.optim.Optimizer, cfg: RunConfig, nimg: int) -> float:
    o = cfg.optim
    lr = learning_rate(nimg, lr=o.lr, schedule=o.schedule, t_ref_nimg=o.t_ref_kimg * 1000, warmup_nimg=o.warmup_kimg * 1000)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def restore(run: RunDir, cfg: RunConfig, net: nn.Module, opt: torch.optim.Optimizer, ema: EMA,
            init: Path | str | None, device: torch.device) -> tuple[int, int]:
    """Resume from the run's training state, or start from `init` weights, or from scratch. Returns (nimg, skipped).

    A new start normalises EDM2's weights before the first step (see below); a resume loads them as saved."""
    if run.state.exists():
        state = load_state(run.state, required=("net", "opt", "ema", "nimg", "skipped"))
        if not run.belongs_to(state.get("config_hash", run.config_hash(cfg)), cfg):
            raise CheckpointError(f"{run.state} belongs to another run (its config differs from {run.config}); "
                                  "move it away or use the run directory it came from")
        net.load_state_dict(state["net"], strict=True)
        opt.load_state_dict(state["opt"])
        ema.load_state(state["ema"])
        return int(state["nimg"]), int(state["skipped"])
    if init is not None:
        from ..model import load_model  # local: only needed when tuning

        init_model, _, _ = load_model(init)
        net.load_state_dict(init_model.net.state_dict(), strict=True)
    # EDM2's forced weight normalisation (no-op for DDPM++) before the first step, not only after each one: the
    # reference normalises inside every student pass, so its first step already starts from unit-RMS rows, which
    # imported weights (EDM2's post-hoc EMAs) and a fresh init do not have. The forward pass uses normalised weights
    # either way, but a row of RMS s gets 1/s times the gradient, and an update of a given size turns it 1/s times
    # as far, so the first step would differ. A resumed state was saved normalised, and normalising again is not a
    # no-op (w/(ε + RMS)), so a resume skips this and stays bit-exact.
    net.normalize_weights_()
    for avg in ema.averages:  # the averages start from the weights the first step starts from, not a random net
        torch._foreach_copy_(avg, [v.float() for k, v in net.state_dict().items() if k in ema.names])
    return 0, 0


def freeze_unused_parameters(net: nn.Module) -> None:
    """Stop tracking gradients of parameters the training pass never uses, so DDP does not wait for them.

    DDPM++'s augmentation-label mapping (augment_dim > 0, as in the public EDM CIFAR-10 checkpoints) only runs when
    augmentation labels are passed, which ECT never does; DDP would otherwise fail on the second step with
    "Expected to have finished reduction in the prior iteration". The optimiser skips these parameters either way
    (their gradient stays None), so one process and N processes still train identically.
    """
    map_augment = getattr(net, "map_augment", None)
    if isinstance(map_augment, nn.Module):
        map_augment.requires_grad_(False)


def save_checkpoint(run: RunDir, cfg: RunConfig, net: nn.Module, opt: torch.optim.Optimizer, ema: EMA,
                    nimg: int, skipped: int, *, is_main: bool) -> None:
    if not is_main:
        return
    save_state(run.state, {"net": net.state_dict(), "opt": opt.state_dict(), "ema": ema.to_state(),
                           "nimg": nimg, "skipped": skipped, "config_hash": run.config_hash(cfg)})
    extra = {"nimg": nimg, "objective": cfg.objective.kind}
    for i, label in enumerate(ema.labels):
        path = run.model if i == 0 else run.root / f"model-{label}.safetensors"
        save_model(path, ema.state_dict(i), cfg, extra={**extra, "ema": label})


@torch.no_grad()
def save_sample_grids(run: RunDir, cfg: RunConfig, ema_model: Precond, ema: EMA, nimg: int,
                      device: torch.device, *, is_main: bool) -> None:
    """Fixed-seed sample grids from the EMA weights: Heun for diffusion models, 1 and 2 steps otherwise."""
    if not is_main:
        return
    ema_model.net.load_state_dict(ema.state_dict(0))
    seeds = torch.arange(64)
    kimg = f"{nimg // 1000:06d}"
    if cfg.objective.kind == "diffusion":
        runs = {"heun": dict(method="heun")}
    else:
        runs = {"1step": dict(steps=1), "2step": dict(steps=2)}
    from ..imageio import save_images

    for name, kwargs in runs.items():
        images = to_uint8(sample_images(ema_model, cfg, seeds, device=device, batch=64, **kwargs))
        save_images(images, run.samples / f"{name}-{kimg}.png")
        save_images(images, run.root / f"samples-{name}.png")


class StatsMeter:
    """Accumulates loss on the device (no sync) between status lines."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.r_over_t: list[float] = []

    def add(self, loss_sum: Tensor, count: int, r_over_t: float) -> None:
        self.loss += loss_sum.double()
        self.count += count
        self.r_over_t.append(r_over_t)

    def summary(self, dist: rt_dist.Dist) -> dict[str, float]:
        total = rt_dist.all_reduce_sum_(self.loss.clone())  # every rank's loss sum; count is the global batch
        out = {"loss": float(total) / max(self.count, 1), "count": self.count / dist.world_size,
               "r_over_t": sum(self.r_over_t) / max(len(self.r_over_t), 1)}
        self.reset()
        return out


def check_data_matches(cfg: RunConfig, data: ImageDataset, *, world_size: int = 1) -> None:
    """The network's image shape and label count must match the data (one clear error otherwise)."""
    net = cfg.net
    if data.channels != net.img_channels or data.resolution != net.img_resolution:
        raise ValueError(
            f"data {data.description} has {data.channels}×{data.resolution}×{data.resolution} images but the network "
            f"expects {net.img_channels}×{net.img_resolution}×{net.img_resolution} (set --data.resolution to pad, "
            "or use a model/preset made for this data)"
        )
    if net.label_dim and (data.labels is None or data.num_classes != net.label_dim):
        have = "no labels" if data.labels is None else f"{data.num_classes} classes"
        raise ValueError(f"the network is conditioned on {net.label_dim} classes but {data.description} has {have} "
                         "(set --data.use-labels, or --net.label-dim 0 for an unconditional model)")
    B, accum = cfg.train.batch, cfg.train.accum
    if B % (accum * world_size):
        raise ValueError(f"--train.batch {B} must be divisible by --train.accum × processes = {accum} × {world_size}")


def _wrap_for_training(model: Precond, cfg: RunConfig, dist: rt_dist.Dist,
                       device: torch.device) -> tuple[nn.Module, Precond]:
    """(student f: compiled and/or DDP-wrapped, target f: the same weights without DDP's gradient hooks).

    With cfg.runtime.compile a single process compiles the whole f_θ (preconditioning + network: the scalings,
    the bf16 casts and the boundary select fuse with the network's first and last layers); under DDP only the
    network is compiled. The compiled module shares `model`'s parameters, so the optimiser, EMA and
    checkpoints (which hold `model.net`) are unaffected. Expect one graph for the student pass and one for
    the target pass, whose batch size varies with the number of r > 0 rows (`training_step` declares which is
    which: `with_batch_hint`). It also sets the network's norm recomputation for this device (`recompute_norms`).
    """
    model.net.set_recompute_norms(recompute_norms(cfg.runtime.recompute_norms, device, compiled=cfg.runtime.compile))
    if cfg.runtime.compile and dist.world_size == 1:
        target_model = torch.compile(model)  # an OptimizedModule: .net, .compute_dtype etc. reach `model`
    elif cfg.runtime.compile:
        target_model = replace_precond(model, net=torch.compile(model.net))
    else:
        target_model = model
    train_model: nn.Module = target_model
    if dist.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            target_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return train_model, target_model


def with_batch_hint(f: Callable[..., Tensor], *, dynamic: bool) -> Callable[..., Tensor]:
    """`f` (a compiled f_θ) with its inputs' batch dimension declared to torch.compile before every call: static for
    the student pass (always the whole batch), dynamic for the target pass (the r > 0 rows, padded to 8).

    Both passes enter one compiled function, whose input sizes torch.compile otherwise tracks together, so the
    graphs it builds depended on the first step: a first target pass smaller than the batch (a run starting in an
    early ECT stage) made the student graph dynamic too, and one as large as the batch (the last stage) cost an
    extra static target graph that was replaced at the next size. Declared, every run compiles the same two: a
    static student graph (forward + backward) and a dynamic target graph, each once. A hint is only read when a
    graph is compiled; it costs nothing afterwards.
    """
    mark = torch._dynamo.maybe_mark_dynamic if dynamic else torch._dynamo.mark_static

    def hinted(x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        for a in (x, sigma, class_labels, *kwargs.values()):
            if isinstance(a, Tensor) and a.ndim > 0:
                mark(a, 0)
        return f(x, sigma, class_labels, **kwargs)

    return hinted


def recompute_norms(choice: str, device: torch.device, *, compiled: bool) -> bool:
    """Whether eager training recomputes GroupNorm + SiLU in backward (TrainConfig.recompute_norms)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--runtime.recompute-norms must be auto, on or off, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and not compiled)


def _describe(p: Precision, device: torch.device) -> str:
    name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(p.dtype, "fp32")
    return name + (" with TF32" if p.tf32 and device.type == "cuda" else "")


def _set_backend_flags(device: torch.device) -> None:
    """Process-wide CUDA settings; TF32 is part of each step's precision (`set_step_precision`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _stage(cfg: RunConfig, nimg: int, total_nimg: int) -> int:
    if cfg.objective.kind != "ect":
        return 0
    return ect_stage(nimg, stage_nimg(cfg.objective, total_nimg), from_scratch=cfg.objective.from_scratch)


def _next(nimg: int, kimg: float) -> float:
    """The next multiple of `kimg` (in images) after `nimg`; infinity when the interval is off."""
    if kimg <= 0:
        return math.inf
    step = kimg * 1000
    return (math.floor(nimg / step) + 1) * step


def _img_shape(cfg: RunConfig) -> tuple[int, int, int]:
    return (cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)


def _data_dim(cfg: RunConfig) -> int:
    c, h, w = _img_shape(cfg)
    return c * h * w


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ------------------------------------------------------------------------------------------- fast path helpers


def _guard_mode(guard: str, device: torch.device, world_size: int) -> str:
    """"device" (skip non-finite steps on the GPU, no host sync) for one CUDA process, else "sync"."""
    if guard == "auto":
        return "device" if device.type == "cuda" and world_size == 1 else "sync"
    if guard not in ("sync", "device"):
        raise ValueError(f"guard must be 'auto', 'sync' or 'device', got {guard!r}")
    if guard == "device" and world_size > 1:
        raise ValueError("guard='device' is single-process only (DDP manages the .grad tensors); use 'sync'")
    return guard


def _step_guard(opt: torch.optim.Optimizer, target_model: nn.Module, device: torch.device):
    """The optimiser's DeviceStepGuard, made on first use (kept on the optimiser object, not in its state_dict)."""
    from ..runtime.perf import DeviceStepGuard, make_state_capturable

    params = [p for p in target_model.net.parameters() if p.requires_grad]
    guard = getattr(opt, "_ectune_step_guard", None)
    if guard is None or len(guard.params) != len(params) or any(a is not b for a, b in zip(guard.params, params)):
        make_state_capturable(opt, device)  # step counters on the GPU, so the skip needs no host sync
        guard = DeviceStepGuard(params)
        opt._ectune_step_guard = guard
    return guard


_RESIDENT_MAX_FRACTION = 0.2  # keep a dataset on the GPU only if it takes at most this share of its memory


def _load_rows(data: ImageDataset, indices: Tensor, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """uint8 images and labels of `indices`, on `device`. On CUDA a dataset that fits easily is copied to the GPU
    once and gathered there (no per-step host gather or pageable copy); otherwise `load_batch` on the host."""
    resident = _resident_data(data, device)
    if resident is None:
        images, labels = load_batch(data, indices)
        return images, None if labels is None else labels.to(device)
    images_dev, labels_dev = resident
    if indices.ndim != 1 or indices.dtype != torch.int64:
        raise ValueError(f"indices must be an int64 vector, got {indices.dtype} {tuple(indices.shape)}")
    idx = indices.to(device, non_blocking=True)
    return images_dev.index_select(0, idx), None if labels_dev is None else labels_dev.index_select(0, idx)


def _resident_data(data: ImageDataset, device: torch.device) -> tuple[Tensor, Tensor | None] | None:
    if device.type != "cuda":
        return None
    cached = data.__dict__.get("_ectune_resident")
    if cached is not None and cached[0] == device and cached[1] is data.images:
        return cached[2], cached[3]
    nbytes = data.images.numel() * data.images.element_size()
    if nbytes > _RESIDENT_MAX_FRACTION * torch.cuda.get_device_properties(device).total_memory:
        return None
    images = data.images.to(device)
    labels = None if data.labels is None else data.labels.to(device)
    data.__dict__["_ectune_resident"] = (device, data.images, images, labels)
    return images, labels
