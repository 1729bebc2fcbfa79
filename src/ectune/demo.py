"""The default job: diffusion pretraining → ECT tuning → 1- and 2-step sample grids on Fashion-MNIST, sized to a
time budget on the machine it runs on.

Identical-looking 2-core machines differ about threefold in speed, so a fixed image budget cannot promise a
duration. The job times a few steps of each phase first (`measure_speed`), then picks the image budgets that fit
(`plan_budget`: the preset's 2 : 1 split between pretraining and tuning, at most the preset's own 48k + 24k images),
and writes that plan to `RUNS/demo.json` before training. Training is deterministic for a given plan, and a
rerun reuses the stored plan, so it resumes the same runs instead of measuring again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .config import RunConfig
from .presets import get_preset

PRESET = "fashion-mnist"
HEUN_NFE = 35  # the pretraining run's Heun sample grid (EDM: 2·18 − 1)
OVERHEAD = 0.1  # share of the budget kept for start-up, checkpoints, status lines and grids the estimate misses


@dataclass(frozen=True)
class Plan:
    """Image budgets of the two phases and the speeds they were sized from (sec per 1000 images, this machine)."""

    pretrain_kimg: float
    tune_kimg: float
    pretrain_sec_per_kimg: float
    tune_sec_per_kimg: float
    sample_sec: float
    minutes: float
    threads: int = 0  # CPU threads (RuntimeConfig.threads; 0 = torch's default)

    @property
    def expected_sec(self) -> float:
        return (self.pretrain_kimg * self.pretrain_sec_per_kimg + self.tune_kimg * self.tune_sec_per_kimg
                + self.sample_sec)

    def at_preset_budget(self) -> Plan:
        """This plan with the preset's own image budgets (48k + 24k), for saying how long those would take."""
        return replace(self, pretrain_kimg=get_preset(PRESET, "pretrain").train.total_kimg,
                       tune_kimg=get_preset(PRESET, "tune").train.total_kimg)

    def configs(self) -> tuple[RunConfig, RunConfig]:
        """The preset's pretrain and tune configs at this plan's budgets: intervals and EMA half-lives scale with
        the budget (the preset's half-lives are 10k and 5k images for 48k and 24k), stages stay two."""
        out = []
        for mode, kimg in (("pretrain", self.pretrain_kimg), ("tune", self.tune_kimg)):
            cfg = get_preset(PRESET, mode)
            scale = kimg / cfg.train.total_kimg
            cfg = replace(cfg, train=replace(cfg.train, total_kimg=kimg),
                          ema=replace(cfg.ema, halflife_kimg=round(cfg.ema.halflife_kimg * scale, 6)),
                          runtime=replace(cfg.runtime, status_kimg=_round_kimg(kimg / 12, cfg),
                                          save_kimg=_round_kimg(kimg / 4, cfg), sample_kimg=kimg, threads=self.threads))
            out.append(cfg)
        return out[0], out[1]


def plan_budget(*, minutes: float, pretrain_sec_per_kimg: float, tune_sec_per_kimg: float, sample_sec: float,
                threads: int = 0) -> Plan:
    """The largest budgets with pretraining = 2 × tuning images that fit `minutes` (less OVERHEAD), capped at the
    preset's own budgets and rounded down to whole steps of ten batches."""
    pre, tune = get_preset(PRESET, "pretrain"), get_preset(PRESET, "tune")
    seconds = max(minutes * 60 * (1 - OVERHEAD) - sample_sec, 0.0)
    tune_kimg = seconds / (2 * pretrain_sec_per_kimg + tune_sec_per_kimg)
    unit = 10 * pre.train.batch / 1000
    tune_kimg = min(tune.train.total_kimg, max(unit, math.floor(tune_kimg / unit) * unit))
    pretrain_kimg = min(pre.train.total_kimg, 2 * tune_kimg)
    return Plan(round(pretrain_kimg, 3), round(tune_kimg, 3), pretrain_sec_per_kimg, tune_sec_per_kimg, sample_sec,
                minutes, threads)


def measure_speed(*, threads: int = 0, steps: int = 3) -> tuple[float, float, float]:
    """(pretrain sec/kimg, tune sec/kimg, sampling seconds) on this machine with `threads` CPU threads (0 = torch's
    default): `steps` timed training steps of each phase after one untimed step (tuning in its last stage, where
    the target pass covers nearly every row), and the grids' network evaluations at the measured forward speed."""
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(steps)
    finally:
        torch.set_num_threads(default_threads)


def fastest_threads(log) -> tuple[int, tuple[float, float, float]]:
    """(threads, its measure_speed) for the faster of torch's default and one thread. A 2-core machine whose cores
    are shared with other work can run several times faster on one thread (benchmarks/cpu_speed.py)."""
    results = {0: measure_speed()}
    if torch.get_num_threads() > 1 and not torch.cuda.is_available():
        results[1] = measure_speed(threads=1)
    total = {t: 2 * r[0] + r[1] for t, r in results.items()}
    best = min(total, key=total.get)
    if len(results) > 1:
        log(f"  {torch.get_num_threads()} threads: {1000 / results[0][0]:.0f} img/s pretraining; 1 thread: "
            f"{1000 / results[1][0]:.0f} img/s; using {'1 thread' if best == 1 else 'the default'}")
    return best, results[best]


def _measure(steps: int) -> tuple[float, float, float]:
    from .data import open_dataset
    from .model import build_model, grid_seeds, sample_images
    from .objectives import last_stage_start, loss_spec
    from .runtime.device import resolve_device
    from .runtime.distributed import Dist
    from .training.fastpath import FastPath
    from .training.step import make_optimizer, training_step

    out, sample_sec = [], 0.0
    device = resolve_device("auto")
    for mode in ("pretrain", "tune"):
        cfg = get_preset(PRESET, mode)
        data = open_dataset(cfg.data)
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        opt = make_optimizer(cfg, list(model.net.parameters()), device)
        fast = FastPath(model, cfg, dist=Dist(), device=device)
        spec = loss_spec(cfg.objective, data_dim=math.prod(cfg.net.image_shape), sigma_data=cfg.precond.sigma_data)
        nimg = 0 if mode == "pretrain" else last_stage_start(cfg.objective, total_nimg=cfg.train.total_kimg * 1000)
        model.train()
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            bool(training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=Dist()).kept)
        out.append((time.perf_counter() - start) / (steps * cfg.train.batch) * 1000)
        if mode == "pretrain":
            model.eval()
            start = time.perf_counter()
            sample_images(model, cfg, grid_seeds(cfg)[0], steps=1, device=device).sum().item()  # .item(): wait
            # One grid at 1 NFE, scaled to the job's grids: Heun, then 1- and 2-step, twice.
            sample_sec = (HEUN_NFE + 1 + 2) * 2 * (time.perf_counter() - start)
    return out[0], out[1], sample_sec


def load_or_make_plan(runs: Path, *, minutes: float, kimg: tuple[float, float] | None, log) -> Plan:
    """The plan stored in RUNS/demo.json (a rerun resumes it), else a new one from `kimg` (pretrain, tune) or from
    measuring this machine; written before anything trains."""
    path = runs / "demo.json"
    if path.exists():
        try:
            plan = Plan(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a demo plan ({exc}); delete it or use another --runs directory") from None
        log(f"resuming the plan in {path}: pretraining {plan.pretrain_kimg:g}k images, tuning {plan.tune_kimg:g}k "
            "(delete the directory to plan again)")
        return plan
    if kimg is not None:
        plan = Plan(kimg[0], kimg[1], math.nan, math.nan, math.nan, minutes)
    else:
        log("timing a few training steps on this machine to size the job ...")
        threads, (pre, tune, sample) = fastest_threads(log)
        plan = plan_budget(minutes=minutes, pretrain_sec_per_kimg=pre, tune_sec_per_kimg=tune, sample_sec=sample,
                           threads=threads)
    runs.mkdir(parents=True, exist_ok=True)
    from .runtime.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(asdict(plan), indent=2))
    return plan


def _round_kimg(kimg: float, cfg: RunConfig) -> float:
    """`kimg` rounded up to whole batches (status and save intervals fall on step boundaries)."""
    batch_kimg = cfg.train.batch / 1000
    return round(max(1, math.ceil(kimg / batch_kimg)) * batch_kimg, 3)
