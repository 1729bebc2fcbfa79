"""The `ectune` command line. Training commands take a preset plus any config field as a flag
(`--train.batch 64`, `--objective.q 4`, ...; generated from ectune.config by tyro)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .config import RunConfig, check_all, checks_deferred, to_dict

TRAIN_COMMANDS = ("pretrain", "tune")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS) + "\nrun `ectune COMMAND --help` for its options")
        return 0
    if argv[0] == "--version":
        print(f"ectune {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ectune: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .runtime import distributed as rt_dist

    owns_process_group = not rt_dist.is_initialized()  # under torchrun the command itself joins the group
    try:
        code = COMMANDS[command](command, rest) or 0
        if owns_process_group and code == 0:
            rt_dist.shutdown()  # on success only: after a failure the other ranks may never arrive
        return code
    except KeyboardInterrupt:
        print("ectune: interrupted; rerun the same command to resume from the last save", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:  # our errors carry one clear sentence
        print(f"ectune {command}: error: {exc}", file=sys.stderr)
        return 1


def _train_parser(command: str) -> argparse.ArgumentParser:
    from .presets import preset_names

    p = argparse.ArgumentParser(prog=f"ectune {command}", add_help=False,
                                description=f"{command} a model; any config field can follow as --section.field VALUE")
    p.add_argument("--preset", default="fashion-mnist", help=f"one of: {', '.join(preset_names())}")
    # --run-dir: torchrun's own parser takes any "--run" prefix as its --run-path option.
    p.add_argument("--run", "--run-dir", dest="run", type=Path, help="run directory (rerun the same command to resume)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--until-kimg", type=float, default=None, help="stop (after saving) at this many kimg; rerun to continue")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if command == "tune":
        p.add_argument("--init", type=Path, help="pretrained ectune model or run directory to tune from")
        p.add_argument("--objective", choices=("ect", "ict"), default="ect", help="ECT (default) or the iCT baseline")
    p.add_argument("-h", "--help", action="store_true")
    return p


def resolve_train_config(command: str, rest: Sequence[str]) -> tuple[argparse.Namespace, RunConfig]:
    import tyro

    from .presets import get_preset
    from .training.rundir import adopt_init_architecture

    parser = _train_parser(command)
    args, overrides = parser.parse_known_args(rest)
    if args.help:
        parser.print_help()
        print("\nconfig fields (defaults from the preset):")
        overrides = ["--help"]
    base = get_preset(args.preset, command, objective=getattr(args, "objective", "ect"))
    init = getattr(args, "init", None)
    if init is not None:
        base = adopt_init_architecture(base, init)
    with checks_deferred():
        cfg = tyro.cli(RunConfig, default=base, args=list(overrides), prog=f"ectune {command}")
    return args, check_all(cfg)


def cmd_train(command: str, rest: Sequence[str]) -> int:
    args, cfg = resolve_train_config(command, rest)
    if args.dry_run:
        print(json.dumps(describe(cfg, command=command, init=getattr(args, "init", None)), indent=2))
        return 0
    if args.run is None:
        raise ValueError(f"ectune {command} needs --run DIR (the run directory)")
    if args.until_kimg is not None and not (math.isfinite(args.until_kimg) and args.until_kimg >= 0):
        raise ValueError(f"--until-kimg {args.until_kimg}: expected a number >= 0")
    from .training.loop import train

    result = train(cfg, args.run, init=getattr(args, "init", None), command=command, until_kimg=args.until_kimg,
                   show_progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{command} done: {result.nimg / 1000:.1f} kimg, final loss {result.final_loss:.4g}, "
              f"skipped steps {result.skipped_steps}; model {result.run_dir / 'model.safetensors'}")
    return 0


def describe(cfg: RunConfig, **extra: object) -> dict:
    from .nets import build_net, count_params

    with torch.device("meta"):
        params = count_params(build_net(cfg.net))
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()}, "params": params,
            "params_millions": round(params / 1e6, 1), "config": to_dict(cfg)}


def cmd_sample(command: str, rest: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ectune sample", description="generate images from a model or run directory")
    p.add_argument("model", type=Path)
    p.add_argument("--steps", type=int, default=1, help="consistency steps (1, 2, ...)")
    p.add_argument("--mid-t", type=float, nargs="+", default=None, help="intermediate times (default: the model's)")
    p.add_argument("--method", choices=("consistency", "heun"), default="consistency")
    p.add_argument("--sigma-min-shift", type=float, default=None,
                   help="boundary f(x, σ_min) = x of consistency sampling (0.003: the public ECT checkpoints; "
                        "0: exact f(x, 0) = x; default: the model's sample.sigma_min_shift)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--class", dest="class_label", type=int, default=None, help="class id for conditional models")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, required=True, help="grid.png, images.npz, or a directory for PNGs")
    p.add_argument("--force", action="store_true", help="consistency-sample a diffusion model anyway")
    a = p.parse_args(rest)
    for name in ("steps", "n", "batch"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} {getattr(a, name)}: expected an integer >= 1")
    if not 0 <= a.seed <= 2**63 - 1 - a.n:
        raise ValueError(f"--seed {a.seed}: expected an integer in [0, 2**63 - n)")
    from .imageio import save_images
    from .model import load_model, sample_images
    from .sampling import to_uint8
    from .training.loop import resolve_device

    from .runtime import distributed as rt_dist

    device = resolve_device(a.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = rt_dist.init_distributed(device.type)  # under torchrun each rank samples a slice of the seeds
    model, cfg, extra = load_model(a.model, device=device)
    cfg = with_sampling_boundary(cfg, a.sigma_min_shift)
    if a.mid_t is not None:
        try:
            replace(cfg.sample, mid_t=tuple(a.mid_t))
        except ValueError:
            raise ValueError(f"--mid-t {' '.join(map(str, a.mid_t))}: expected times strictly decreasing inside "
                             f"(0, t_max = {cfg.sample.t_max})") from None
    if a.method == "consistency" and extra.get("objective") == "diffusion" and not a.force:
        raise ValueError(f"{a.model} is a diffusion model (pretrained, not tuned): 1-2 consistency steps give blurs. "
                         "Use --method heun, tune it with `ectune tune --init`, or pass --force")
    seeds = torch.arange(a.seed, a.seed + a.n)
    if cfg.net.label_dim == 0 and a.class_label is not None:
        raise ValueError(f"--class {a.class_label}: the model is unconditional")
    if a.class_label is not None and not 0 <= a.class_label < cfg.net.label_dim:
        raise ValueError(f"--class {a.class_label}: the model has {cfg.net.label_dim} classes (0..{cfg.net.label_dim - 1})")
    labels = None if a.class_label is None else torch.full((a.n,), a.class_label)
    mine = rt_dist.rank_seeds(torch.arange(a.n), dist.rank, dist.world_size)  # positions of this rank's samples
    images = sample_images(model, cfg, seeds[mine], steps=a.steps, mid_t=a.mid_t, method=a.method,
                           class_labels=None if labels is None else labels[mine], batch=a.batch, device=device)
    images = rt_dist.all_gather_cat(to_uint8(images))
    if dist.is_main:
        out = save_images(images, a.out)
        steps = a.steps if a.method == "consistency" else cfg.sample.heun_steps
        print(f"wrote {a.n} samples ({a.method}, {steps} steps, {dist.world_size} process(es)) to {out}")
    return 0


def with_sampling_boundary(cfg: RunConfig, sigma_min_shift: float | None) -> RunConfig:
    """cfg with a --sigma-min-shift given on the command line as its sampling boundary (None: unchanged)."""
    if sigma_min_shift is None:
        return cfg
    return replace(cfg, sample=replace(cfg.sample, sigma_min_shift=sigma_min_shift))


def cmd_info(command: str, rest: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ectune info", description="config, images seen, parameters and files of a run or model")
    p.add_argument("path", type=Path)
    a = p.parse_args(rest)
    from .runtime.checkpoint import read_model_meta

    cfg, extra = read_model_meta(a.path)
    info = describe(cfg, path=a.path, nimg=extra.get("nimg"), objective=extra.get("objective"), ema=extra.get("ema"))
    if a.path.is_dir():
        info["files"] = sorted(str(f.relative_to(a.path)) for f in a.path.rglob("*") if f.is_file())
    print(json.dumps(info, indent=2))
    return 0


def cmd_convert_images(command: str, rest: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="ectune convert-images",
                                description="convert a folder of images (class subfolders optional) to EDM's dataset layout")
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path, help="DEST.zip or a directory")
    p.add_argument("--resolution", type=int, default=None, help="centre-crop and resize to this size")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None)
    a = p.parse_args(rest)
    from .data import convert_images

    n = convert_images(a.src, a.dest, resolution=a.resolution, channels=a.channels)
    print(f"wrote {n} images to {a.dest}")
    return 0


def _lazy(module: str, name: str):
    """A command implemented in another module, imported only when it runs."""

    def run(command: str, rest: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(command, rest)

    return run


COMMANDS = {
    "pretrain": cmd_train,
    "tune": cmd_train,
    "sample": cmd_sample,
    "info": cmd_info,
    "convert-images": cmd_convert_images,
    "eval": _lazy("ectune.cli_eval", "cmd_eval"),
    "ref-stats": _lazy("ectune.cli_eval", "cmd_ref_stats"),
    "import-edm": _lazy("ectune.importers.cli", "cmd_import_edm"),
}


if __name__ == "__main__":
    sys.exit(main())
