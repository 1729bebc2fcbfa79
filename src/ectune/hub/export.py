"""`ectune export`: a model (run directory, model file or hf:// reference) as a Hugging Face Hub-style folder:

    model.safetensors   the weights, with the full config and sampler defaults in the safetensors metadata (the
                        same format `ectune` writes everywhere, so `load_model(FOLDER)` and every command read it)
    config.json         the same facts as plain JSON, for the Hub and tools without ectune
    README.md           the model card: YAML front-matter (library, task, licence, data, sampler defaults,
                        measured results with their protocol), then prose

The folder is built beside the destination and renamed into place, so an interrupted export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .card import CardInfo, hub_config, render_card
from .licence import CC_BY_NC_SA, LICENCES, LicenceUnknown, Provenance, provenance
from .metrics import recorded_metrics
from .refs import parse_hub_ref, resolve_model_path


def check_destination(dest: Path) -> None:
    """Refuse to export into anything but a new or empty folder (an export never mixes with other files)."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} is a file; the export destination must be a new or empty folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty; the export destination must be a new or empty folder")


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """A temporary folder beside `dest` that becomes `dest` when the block succeeds (and vanishes when it fails)."""
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets the permissions mkdir would give
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); os.replace onto a directory needs it gone on some systems
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe_model(source: Path | str, *, name: str | None = None, licence: str | None = None,
                   repo_id: str | None = None, library_name: str = "ectune") -> tuple[Path, CardInfo]:
    """The local path of `source` and everything its card will say. `licence` overrides the recorded lineage."""
    import torch

    from ..nets import build_net, count_params
    from ..runtime.checkpoint import read_model_meta

    path = resolve_model_path(source)
    cfg, extra = read_model_meta(path)
    prov = _provenance(path, extra, licence)
    hub = parse_hub_ref(source)
    if hub and not prov.base_model:
        prov = Provenance(prov.licence, prov.reason, hub.repo_id)
    with torch.device("meta"):  # parameters only (the weights file also holds buffers); nothing is allocated
        params = count_params(build_net(cfg.net))
    metrics = recorded_metrics(path, split=cfg.data.split, mid_t=tuple(cfg.sample.mid_t), heun_steps=cfg.sample.heun_steps)
    default_name = repo_id.split("/")[-1] if repo_id else (hub.repo_id.split("/")[-1] if hub else
                                                          (path.name if path.is_dir() else path.stem))
    return path, CardInfo(name=name or default_name, cfg=cfg, extra=extra, params=params, provenance=prov,
                          metrics=metrics, repo_id=repo_id, library_name=library_name)


def _provenance(path: Path, extra: dict, licence: str | None) -> Provenance:
    """The recorded lineage's licence; `licence` (--license) decides only where the lineage cannot be followed, or
    makes it stricter: weights derived from non-commercial ones are never relabelled MIT."""
    if licence is None:
        return provenance(path, extra)
    if licence not in LICENCES:
        raise ValueError(f"--license {licence}: expected one of {', '.join(LICENCES)}")
    try:
        recorded = provenance(path, extra)
    except LicenceUnknown:
        return Provenance(licence, "chosen by the exporter (--license)")
    if recorded.licence == CC_BY_NC_SA and licence != CC_BY_NC_SA:
        raise ValueError(f"--license {licence}: {path} is {CC_BY_NC_SA} ({recorded.reason}), and its licence carries over")
    return Provenance(licence, recorded.reason if licence == recorded.licence else "chosen by the exporter (--license)",
                      recorded.base_model)


def export_hub(source: Path | str, dest: Path, *, name: str | None = None, licence: str | None = None,
               repo_id: str | None = None) -> CardInfo:
    """Write the Hub-style folder of `source` to `dest` (new or empty). Returns what its card says."""
    from ..runtime.checkpoint import atomic_write_text, load_model_weights, save_model

    check_destination(dest)
    path, info = describe_model(source, name=name, licence=licence, repo_id=repo_id)
    # The licence travels inside the weights file too, so that tuning this export again keeps it.
    extra = {**info.extra, "license": info.provenance.licence, "license_reason": info.provenance.reason}
    if info.provenance.base_model:
        extra["base_model"] = info.provenance.base_model
    weights = load_model_weights(path)
    with staged_folder(dest) as tmp:
        save_model(tmp / "model.safetensors", weights, info.cfg, extra=extra)
        atomic_write_text(tmp / "config.json", json.dumps(hub_config(info), indent=2) + "\n")
        atomic_write_text(tmp / "README.md", render_card(info))
    return info
