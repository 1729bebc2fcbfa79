"""The training loop shared by diffusion pretraining, ECT tuning and the iCT baseline.

The objectives differ only in how (t, r) are drawn (ectune.objectives); one step is ectune.training.step, and
every speed-only choice (compile, DDP, resident data, the device-side step guard) sits behind one
`FastPath`. Progress is counted in images: every random draw of a step is a function of (seed, images seen), so a
resumed run is bit-identical to an uninterrupted one and the result does not depend on the number of processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import open_dataset
from ..ema import EMA
from ..model import build_model, grid_seeds, sample_images, sampling_boundary
from ..nets import count_params
from ..objectives import loss_spec, stage
from ..precond import Precision, Precond
from ..runtime import distributed as rt_dist
from ..runtime.device import peak_memory_gb, resolve_device
from ..sampling import to_uint8
from .fastpath import FastPath
from .report import IntervalMeter, JobProgress, Reporter
from .rundir import RunDir
from .signals import SaveOnSignal, TrainingInterrupted
from .state import check_data_matches, freeze_unused_parameters, restore, save_checkpoint
from .step import load_target_guide, make_optimizer, set_learning_rate, step_precision, training_step


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many consecutive non-finite steps)."""


@dataclass
class TrainResult:
    run_dir: Path
    nimg: int
    final_loss: float
    skipped_steps: int
    seconds: float  # wall-clock time of this train() call


def train(
    cfg: RunConfig,
    run_dir: Path | str,
    *,
    init: Path | str | None = None,
    command: str = "train",
    until_kimg: float | None = None,
    show_progress: bool = True,
    job: JobProgress | None = None,
) -> TrainResult:
    """Train (or resume) the run in `run_dir` to cfg.train.total_kimg (or `until_kimg`, whichever is first).
    Progress shows on its own bar, or as the phase `command` of `job`'s bar."""
    started = time.time()
    sampling_boundary(cfg)  # a bad sample.sigma_min_shift stops here, not at the first sample grid
    dist, device = _processes(cfg)
    run = RunDir(Path(run_dir))
    cfg = run.prepare(cfg, init=init, command=command, is_main=dist.is_main)
    rt_dist.barrier()

    # Set-up: data, model, optimiser, EMA; then the state to start from.
    data = open_dataset(cfg.data)
    check_data_matches(cfg, data, world_size=dist.world_size)
    torch.manual_seed(cfg.train.seed)  # initial weights (all later randomness is per step: step.step_generator)
    model = build_model(cfg).to(device)
    net = model.net  # the raw module: saved, averaged, normalised
    opt = make_optimizer(cfg, list(net.parameters()), device)
    ema = EMA(net, cfg.ema)
    nimg, skipped = restore(run, cfg, net=net, opt=opt, ema=ema, init=init)
    rt_dist.check_same_across_ranks(nimg, what=f"images seen in {run.state}")
    freeze_unused_parameters(net)
    fast = FastPath(model, cfg, dist=dist, device=device)
    guide = load_target_guide(cfg, model, device)  # None unless the target is guided
    spec = loss_spec(cfg.objective, data_dim=math.prod(cfg.net.image_shape), sigma_data=cfg.precond.sigma_data)
    ema_model = build_model(cfg).to(device).eval()

    total_nimg = int(cfg.train.total_kimg * 1000)
    stop_nimg = total_nimg if until_kimg is None else min(total_nimg, int(until_kimg * 1000))
    reporter = Reporter(run.root, total_kimg=stop_nimg / 1000, start_kimg=nimg / 1000, enabled=dist.is_main,
                        progress=show_progress, job=job, phase=command, cfg=cfg)
    reporter.log(f"{command}: {count_params(net) / 1e6:.2f}M parameters, {len(data)} images ({data.description}), "
                 f"device {device}, {dist.world_size} process(es), starting at {nimg / 1000:g} kimg")
    rt = cfg.runtime
    status, save = Every(rt.status_kimg, nimg, at_end=True), Every(rt.save_kimg, nimg, at_end=True)
    sample, evaluate = Every(rt.sample_kimg, nimg), Every(rt.eval_kimg, nimg)
    meter = IntervalMeter(device)
    bad_in_a_row, last_loss, last_save = 0, math.nan, None
    precision = None
    signals = SaveOnSignal(rt.save_on_signal)  # handlers that only record a signal; checked after each step

    model.train()
    try:
        while nimg < stop_nimg:
            lr = set_learning_rate(opt, cfg, nimg)
            if (p := step_precision(cfg, nimg, device)) != precision:  # a stage changed the precision (and the speed)
                precision = p
                reporter.log(f"precision from {nimg / 1000:.1f} kimg: {_describe(p, device)}")
            step = training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=dist,
                                 guide=guide)
            nimg += cfg.train.batch
            if step.kept:
                bad_in_a_row = 0
                net.normalize_weights_()  # EDM2's forced weight normalisation (no-op for DDPM++)
                ema.update(net, nimg=nimg, batch=cfg.train.batch)  # a skipped step leaves the averages alone too
            else:
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                if bad_in_a_row >= rt.max_bad_steps:
                    raise _too_many_bad_steps(bad_in_a_row, nimg=nimg, run=run, last_save=last_save)
            meter.add(step.loss_sum, cfg.train.batch, step.r_over_t)
            reporter.advance(min(nimg, stop_nimg) / 1000)

            done = nimg >= stop_nimg
            if status.due(nimg, done):
                stats = meter.summary()
                last_loss = stats["loss"]
                reporter.status(dict(
                    kimg=nimg / 1000, loss=last_loss, stage=stage(cfg.objective, nimg=nimg - cfg.train.batch,
                                                                  total_nimg=total_nimg),
                    mean_r_over_t=stats["r_over_t"], lr=lr, sec_per_kimg=stats["sec_per_kimg"],
                    img_per_s=stats["img_per_s"], mem_gb=peak_memory_gb(device), skipped_steps=skipped))
            if save.due(nimg, done):
                save_checkpoint(run, cfg, net=net, opt=opt, ema=ema, nimg=nimg, skipped=skipped, is_main=dist.is_main)
                last_save = nimg
            if sample.due(nimg, done):
                grids = save_sample_grids(run, cfg, ema_model=ema_model, ema=ema, nimg=nimg, device=device,
                                          is_main=dist.is_main)
                reporter.images(nimg / 1000, grids)
            if evaluate.due(nimg, done):
                from ..evaluation import evaluate_in_training

                ema_model.net.load_state_dict(ema.state_dict(0))
                record = evaluate_in_training(ema_model, cfg, data, nimg=nimg, device=device)  # all ranks take part
                if dist.is_main:
                    reporter.metric(record)
            if not done and (signum := signals.requested()):  # every rank gets the same answer at the same step
                if last_save != nimg:
                    save_checkpoint(run, cfg, net=net, opt=opt, ema=ema, nimg=nimg, skipped=skipped,
                                    is_main=dist.is_main)
                raise _interrupted(SaveOnSignal.name(signum), nimg=nimg, run=run, reporter=reporter,
                                   is_main=dist.is_main)
    finally:  # whatever ends the loop, a later signal finds the handlers it had before
        signals.restore()
    reporter.close()
    rt_dist.barrier()
    if dist.is_main:
        run.release_lock()
    return TrainResult(run.root, nimg, last_loss, skipped, time.time() - started)


class Every:
    """An interval in kimg: due each time progress passes a multiple of it, and at the end of the command.
    0 turns it off, at the end too unless `at_end` (the status line and the save always come at the end)."""

    def __init__(self, kimg: float, nimg: int, *, at_end: bool = False) -> None:
        self.step, self.at_end = kimg * 1000, at_end
        self.next = self._after(nimg)

    def _after(self, nimg: int) -> float:
        return math.inf if self.step <= 0 else (math.floor(nimg / self.step) + 1) * self.step

    def due(self, nimg: int, done: bool) -> bool:
        if nimg >= self.next or (done and (self.at_end or self.step > 0)):
            self.next = self._after(nimg)
            return True
        return False


@torch.no_grad()
def save_sample_grids(run: RunDir, cfg: RunConfig, *, ema_model: Precond, ema: EMA, nimg: int, device: torch.device,
                      is_main: bool) -> dict[str, Path]:
    """Fixed-seed sample grids from the EMA weights: Heun for diffusion models, 1 and 2 steps otherwise.
    Returns the grid files written, by sampler name ({} on ranks other than 0)."""
    if not is_main:
        return {}
    ema_model.net.load_state_dict(ema.state_dict(0))
    seeds, cols = grid_seeds(cfg)
    kimg = f"{nimg // 1000:06d}"
    if cfg.objective.kind == "diffusion":
        runs = {"heun": dict(method="heun")}
    else:
        runs = {"1step": dict(steps=1), "2step": dict(steps=2)}
    from ..imageio import save_images

    written = {}
    for name, kwargs in runs.items():
        images = to_uint8(sample_images(ema_model, cfg, seeds, device=device, batch=64, **kwargs))
        save_images(images, run.samples / f"{name}-{kimg}.png", cols=cols)
        save_images(images, run.root / f"samples-{name}.png", cols=cols)
        written[name] = run.samples / f"{name}-{kimg}.png"
    return written


def _processes(cfg: RunConfig) -> tuple[rt_dist.Dist, torch.device]:
    """This process's place among the torchrun processes (one if not under torchrun) and its device."""
    device = resolve_device(cfg.runtime.device)
    dist = rt_dist.init_distributed(device.type)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # TF32 is part of each step's precision (step.apply_step_precision)
    elif cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    return dist, device


def _too_many_bad_steps(count: int, *, nimg: int, run: RunDir, last_save: int | None) -> TrainingError:
    last = (f"the last save is {run.state} at {last_save / 1000:.3f} kimg" if last_save is not None
            else "nothing was saved by this command")
    return TrainingError(f"{count} consecutive steps had non-finite losses, gradients or updated weights at "
                         f"{nimg / 1000:.1f} kimg; stopping ({last}). Lower --optim.lr or check the data.")


def _interrupted(signal_name: str, *, nimg: int, run: RunDir, reporter: Reporter, is_main: bool) -> TrainingInterrupted:
    """Stopping on a signal once the state at `nimg` is saved: log it, close the trackers, release the run."""
    error = TrainingInterrupted(signal_name, nimg, run.state)
    reporter.log(f"{error}")
    reporter.close()
    rt_dist.barrier()
    if is_main:
        run.release_lock()
    return error


def _describe(p: Precision, device: torch.device) -> str:
    name = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(p.dtype, "fp32")
    return name + (" with TF32" if p.tf32 and device.type == "cuda" else "")
