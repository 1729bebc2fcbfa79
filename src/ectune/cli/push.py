"""`ectune push MODEL --repo OWNER/NAME`: export a model (or take an exported folder) and upload it to the Hugging
Face Hub with huggingface_hub (`pip install 'ectune[hub]'`; log in with `hf auth login` or set HF_TOKEN)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from .common import Flag, optional, parse
from .export import Licence


@dataclass(frozen=True, kw_only=True)
class PushArgs:
    """upload a model to the Hugging Face Hub"""

    model: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="MODEL")]
    """run directory, model .safetensors file, or a folder written by `ectune export`"""
    repo: Annotated[str, tyro.conf.arg(metavar="OWNER/NAME")]
    """Hub model repository (created if missing)"""
    format: Literal["hub", "diffusers"] = "hub"
    """folder format when MODEL is not already an exported folder"""
    private: Flag = False
    """create the repository private"""
    revision: Annotated[str | None, optional("BRANCH", unset="the default branch")] = None
    """branch to commit to (created if missing)"""
    message: Annotated[str | None, optional("TEXT", unset="'Upload NAME with ectune'")] = None
    """commit message"""
    license: Annotated[Licence | None, optional("{mit,cc-by-nc-sa-4.0}", unset="from the model's lineage")] = None
    """licence, where the lineage cannot be followed"""


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(PushArgs, command, argv)
    from ..hub.push import is_export_folder, push_folder
    from ..hub.refs import require_hub

    require_hub()  # before any export work
    source = Path(a.model)
    with tempfile.TemporaryDirectory(prefix="ectune-push-") as tmp:
        if is_export_folder(source):
            folder = source
        else:
            folder = Path(tmp) / a.repo.split("/")[-1]
            name = a.repo.split("/")[-1]
            if a.format == "diffusers":
                from ..integrations.diffusers.export import export_diffusers

                export_diffusers(a.model, folder, name=name, licence=a.license, repo_id=a.repo)
            else:
                from ..hub.export import export_hub

                export_hub(a.model, folder, name=name, licence=a.license, repo_id=a.repo)
        commit = push_folder(folder, a.repo, private=a.private, revision=a.revision, message=a.message)
    print(f"pushed {a.model} to https://huggingface.co/{a.repo}" + (f" ({a.revision})" if a.revision else "")
          + (f": {getattr(commit, 'commit_url', '')}" if getattr(commit, "commit_url", None) else ""))
    return 0
