"""`ectune demo`: the default job (pretrain → ECT-tune → 1- and 2-step grids on Fashion-MNIST) within a time budget,
with one progress bar for the whole job; rerun to resume."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

from .common import Flag, optional, parse


@dataclass(frozen=True, kw_only=True)
class DemoArgs:
    """pretrain, ECT-tune and sample on Fashion-MNIST within a time budget"""

    minutes: float = 10.0
    """time budget of the whole job on this machine (sized from a short measured warm-up)"""
    runs: Path = Path("runs")
    """folder of the two runs, the plan (demo.json) and the sample grids"""
    pretrain_kimg: Annotated[float | None, optional("K", unset="sized to --minutes")] = None
    """fix the pretraining images (thousands) instead of sizing them; needs --tune-kimg"""
    tune_kimg: Annotated[float | None, optional("K", unset="sized to --minutes")] = None
    """fix the tuning images (thousands) instead of sizing them; needs --pretrain-kimg"""
    quiet: Flag = False
    """no progress bar"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(DemoArgs, command, argv)
    if not (math.isfinite(a.minutes) and a.minutes > 0):
        raise ValueError(f"--minutes {a.minutes}: expected a number of minutes > 0")
    if (a.pretrain_kimg is None) != (a.tune_kimg is None):
        raise ValueError("--pretrain-kimg and --tune-kimg go together (or neither: the budget is sized to --minutes)")
    fixed = None if a.pretrain_kimg is None else (a.pretrain_kimg, a.tune_kimg)
    if fixed is not None and not all(math.isfinite(k) and k > 0 for k in fixed):
        raise ValueError(f"--pretrain-kimg/--tune-kimg {fixed}: expected numbers of thousands of images > 0")

    from ..demo import OVERHEAD, load_or_make_plan
    from ..imageio import save_images
    from ..model import grid_seeds, load_model, sample_images
    from ..sampling import to_uint8
    from ..training.loop import train
    from ..training.report import JobProgress

    started = time.time()
    plan = load_or_make_plan(a.runs, minutes=a.minutes, kimg=fixed, log=print)
    pre_cfg, tune_cfg = plan.configs()
    estimates = {"pretrain": plan.pretrain_kimg * plan.pretrain_sec_per_kimg,
                 "tune": plan.tune_kimg * plan.tune_sec_per_kimg, "sample": plan.sample_sec}
    if all(math.isfinite(v) for v in estimates.values()):
        print(f"plan: pretrain {plan.pretrain_kimg:g}k images (~{1000 / plan.pretrain_sec_per_kimg:.0f} img/s here), "
              f"tune {plan.tune_kimg:g}k images (~{1000 / plan.tune_sec_per_kimg:.0f} img/s), sample grids "
              f"(~{plan.sample_sec:.0f} s): expected {plan.expected_sec / 60:.1f} minutes in all "
              f"(budget {plan.minutes:g})")
        full = plan.at_preset_budget()
        if full.pretrain_kimg > plan.pretrain_kimg:
            minutes = math.ceil(full.expected_sec / 60 / (1 - OVERHEAD))
            print(f"note: below the preset's {full.pretrain_kimg:g}k + {full.tune_kimg:g}k images the samples are "
                  f"rougher (blurrier, fewer recognisable garments); the full budget would take about {minutes} "
                  f"minutes here: --minutes {minutes}")
    else:  # fixed budgets: the bar still spans the job, by images
        estimates = {"pretrain": plan.pretrain_kimg, "tune": plan.tune_kimg, "sample": 1.0}
    dm, ecm = a.runs / "fm-dm", a.runs / "fm-ecm"
    job = JobProgress(estimates, enabled=not a.quiet)
    try:
        pre = train(pre_cfg, dm, command="pretrain", show_progress=False, job=job)
        tune = train(tune_cfg, ecm, init=dm, command="tune", show_progress=False, job=job)
        job.start("sample", total_kimg=1.0)
        model, cfg, _ = load_model(ecm)
        grids = {}
        seeds, cols = grid_seeds(cfg)
        for steps in (1, 2):
            images = sample_images(model, cfg, seeds, steps=steps)
            grids[steps] = a.runs / f"fm-ecm-{steps}step.png"
            save_images(to_uint8(images), grids[steps], cols=cols)
        job.advance(1.0)
    finally:
        job.close()

    minutes = (time.time() - started) / 60
    print(json.dumps({"minutes": round(minutes, 2), "pretrain_kimg": pre.nimg / 1000, "tune_kimg": tune.nimg / 1000,
                      "pretrain_final_loss": round(pre.final_loss, 4), "tune_final_loss": round(tune.final_loss, 4)}))
    print(f"\ndemo done in {minutes:.1f} minutes: pretrained on {pre.nimg / 1000:g}k images, tuned on "
          f"{tune.nimg / 1000:g}k images")
    print(f"  consistency model : {ecm / 'model.safetensors'}")
    print(f"  1-step samples    : {grids[1]}   (1 network evaluation)")
    print(f"  2-step samples    : {grids[2]}   (2 network evaluations)")
    print(f"  diffusion samples : {dm / 'samples-heun.png'}   (Heun, 35 evaluations)")
    print(f"evaluate it: ectune eval {ecm} --steps 1,2 --n 1000")
    return 0
