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

    from ..hub.refs import resolve_model_path

    local = resolve_model_path(a.path)  # hf://OWNER/NAME -> its folder in the hub cache
    cfg, extra = read_model_meta(local)
    info = describe(cfg, path=local, nimg=extra.get("nimg"), objective=extra.get("objective"), ema=extra.get("ema"))
    if local.is_dir():
        info["files"] = sorted(str(f.relative_to(local)) for f in local.rglob("*") if f.is_file())
    print(json.dumps(info, indent=2))
    return 0
