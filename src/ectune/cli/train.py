"""`ectune pretrain` and `ectune tune`: a preset, plus any config field as `--section.field VALUE`, trained into a
run directory (rerun the same command to resume)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from ..config import RunConfig, check_all
from ..presets import get_preset, preset_names
from .common import Flag, describe, optional, parse, parse_known


@dataclass(frozen=True, kw_only=True)
class PretrainArgs:
    """pretrain a model; any config field can follow as --section.field VALUE"""

    preset: Annotated[str, tyro.conf.arg(help=f"one of: {', '.join(preset_names())}")] = "fashion-mnist"
    # --run-dir: torchrun's own parser takes any "--run" prefix as its --run-path option.
    run: Annotated[Path | None, tyro.conf.arg(aliases=("--run-dir",), metavar="DIR",
                                              help_behavior_hint="(required unless --dry-run)")] = None
    """run directory (rerun the same command to resume)"""
    dry_run: Flag = False
    """print the resolved config as JSON and exit"""
    until_kimg: Annotated[float | None, optional("K", unset="train to --train.total-kimg")] = None
    """stop (after saving) at this many kimg; rerun to continue"""
    quiet: Flag = False
    """no progress bar"""
    # The config tree's sections as top-level groups (`--train.batch`, not `--config.train.batch`); its defaults
    # are the preset's, filled in by a first pass over the options above.
    config: Annotated[RunConfig, tyro.conf.arg(name="")] = field(default_factory=RunConfig)


@dataclass(frozen=True, kw_only=True)
class TuneArgs(PretrainArgs):
    """tune a model; any config field can follow as --section.field VALUE"""

    init: Annotated[Path | None, tyro.conf.arg(metavar="MODEL_OR_RUN", help_behavior_hint="(optional)")] = None
    """pretrained ectune model or run directory to tune from"""
    objective: Literal["ect", "ict"] = "ect"
    """ECT (default) or the iCT baseline"""


def parse_train_args(command: str, argv: Sequence[str]) -> PretrainArgs:
    """The options of `ectune pretrain|tune`, their config checked, with defaults from --preset (and tune's --init
    architecture and --objective)."""
    from ..training.rundir import adopt_init_architecture

    cls = TuneArgs if command == "tune" else PretrainArgs
    first, _ = parse_known(cls, argv)  # unknown options are reported by the full parse below
    tune = isinstance(first, TuneArgs)
    base = get_preset(first.preset, "tune" if tune else "pretrain", objective=first.objective if tune else "ect")
    if tune and first.init is not None:
        base = adopt_init_architecture(base, first.init)
    # Only the config's defaults change: `--dry-run` given stays a switch, not a default that `--no-dry-run` undoes.
    args = parse(cls, command, argv, default=cls(config=base))
    check_all(args.config)
    return args


def run(command: str, argv: Sequence[str]) -> int:
    args = parse_train_args(command, argv)
    init = args.init if isinstance(args, TuneArgs) else None
    if args.config.data.vae and args.config.runtime.eval_kimg > 0:
        # A latent model's samples are decoded images, and the training data has no images to compare them with.
        raise ValueError("--runtime.eval-kimg: latent models are evaluated with `ectune eval MODEL --ref IMAGES`, "
                         "not during training; use 0")
    if args.dry_run:
        print(json.dumps(describe(args.config, command=command, init=init), indent=2))
        return 0
    if args.run is None:
        raise ValueError(f"ectune {command} needs --run DIR (the run directory)")
    if args.until_kimg is not None and not (math.isfinite(args.until_kimg) and args.until_kimg >= 0):
        raise ValueError(f"--until-kimg {args.until_kimg}: expected a number >= 0")
    from ..training.loop import train

    result = train(args.config, args.run, init=init, command=command, until_kimg=args.until_kimg,
                   show_progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{command} done: {result.nimg / 1000:.1f} kimg, final loss {result.final_loss:.4g}, "
              f"skipped steps {result.skipped_steps}; model {result.run_dir / 'model.safetensors'}")
    return 0
