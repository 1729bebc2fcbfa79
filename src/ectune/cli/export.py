"""`ectune export MODEL DIR`: a model (run directory, model file or hf://OWNER/NAME) as a Hugging Face Hub-style
folder (weights, config.json, model card), or with `--format diffusers` as a diffusers pipeline folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from .common import Flag, optional, parse

Licence = Literal["mit", "cc-by-nc-sa-4.0"]


@dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """write a model as a Hugging Face Hub-style folder (or a diffusers pipeline folder)"""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """run directory, model .safetensors file or hf://OWNER/NAME[@REVISION]"""
    dest: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="DIR")]
    """folder to write (new or empty)"""
    format: Literal["hub", "diffusers"] = "hub"
    """hub: model.safetensors + config.json + README.md; diffusers: an ECTPipeline folder (needs ectune[diffusers])"""
    name: Annotated[str | None, optional("NAME", unset="the folder's name")] = None
    """model name in the card"""
    repo: Annotated[str | None, optional("OWNER/NAME", unset="none")] = None
    """Hub repository the folder is meant for (shown in the card's usage lines)"""
    license: Annotated[Licence | None, optional("{mit,cc-by-nc-sa-4.0}", unset="from the model's lineage")] = None
    """licence, where the lineage cannot be followed (a lone model file) or to make it stricter"""
    force: Flag = False
    """export a diffusion (not tuned) model to the diffusers format anyway"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(ExportArgs, command, argv)
    if a.format == "diffusers":
        try:
            from ..integrations.diffusers.export import export_diffusers
        except ImportError as exc:
            raise ValueError(f"--format diffusers: {exc}") from None
        info = export_diffusers(a.model, a.dest, name=a.name or a.dest.name, licence=a.license, repo_id=a.repo,
                                force=a.force)
    else:
        if a.force:
            raise ValueError("--force only applies to --format diffusers")
        from ..hub.export import export_hub

        info = export_hub(a.model, a.dest, name=a.name or a.dest.name, licence=a.license, repo_id=a.repo)
    print(f"exported {a.model} ({info.cfg.net.arch}, {info.params / 1e6:.2f}M parameters, licence "
          f"{info.provenance.licence}, {len(info.metrics)} recorded measurement(s)) as a {a.format} folder: {a.dest}")
    return 0
