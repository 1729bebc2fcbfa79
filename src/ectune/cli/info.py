"""`ectune info`: a run's or model file's config, images seen, parameter count and files, as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Sequence

import tyro

from .common import describe, parse


@dataclass(frozen=True, kw_only=True)
class InfoArgs:
    """config, images seen, parameters and files of a run or model"""

    path: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """model .safetensors file or run directory"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(InfoArgs, command, argv)
    from ..runtime.checkpoint import read_model_meta

    cfg, extra = read_model_meta(a.path)
    info = describe(cfg, path=a.path, nimg=extra.get("nimg"), objective=extra.get("objective"), ema=extra.get("ema"))
    if a.path.is_dir():
        info["files"] = sorted(str(f.relative_to(a.path)) for f in a.path.rglob("*") if f.is_file())
    print(json.dumps(info, indent=2))
    return 0
