"""Which licence a model's weights carry, from where they came.

ectune is MIT-licensed, and so are weights it trains from scratch. NVIDIA releases the public EDM and EDM2
checkpoints (read by `ectune import-edm`) under CC BY-NC-SA 4.0, and weights tuned from them inherit those terms,
however many `--init` steps lie in between. The chain is followed through what ectune records: an imported model's
metadata (`imported_from`), a run directory's config.json (`init`, as given to `ectune tune`), and the `license`
that `ectune export` stamps into every model file it writes (so a model from the Hub keeps its licence when tuned
again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIT = "mit"
CC_BY_NC_SA = "cc-by-nc-sa-4.0"
LICENCES = (MIT, CC_BY_NC_SA)
_MAX_DEPTH = 16  # a longer --init chain is almost surely a cycle of run directories


class LicenceUnknown(ValueError):
    """The lineage of a model cannot be followed (a recorded --init is gone): the user must say."""


@dataclass(frozen=True)
class Provenance:
    """A model's licence id (Hub spelling), why, and the Hub repository it was tuned from (if it names one)."""

    licence: str
    reason: str
    base_model: str | None = None


def run_record(model_path: Path) -> dict[str, Any] | None:
    """The run directory's record ({command, init, config}) beside a run's model file, or None for a lone file."""
    run_dir = model_path if model_path.is_dir() else model_path.parent
    try:
        record = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "command" in record and "config" in record else None


def provenance(model_path: Path | str, extra: dict[str, Any], *, _depth: int = 0) -> Provenance:
    """The licence of the model at `model_path` (a run directory or model file; `extra` its metadata's extra)."""
    from ..runtime.checkpoint import read_model_meta
    from .refs import parse_hub_ref, resolve_model_path

    model_path = Path(model_path)
    if extra.get("license") in LICENCES:
        return Provenance(extra["license"], str(extra.get("license_reason", "recorded in the model file")),
                          extra.get("base_model"))
    if extra.get("imported_from"):
        kind = str(extra.get("kind", "edm")).upper()
        return Provenance(CC_BY_NC_SA, f"imported from NVIDIA's {kind} checkpoint {extra['imported_from']}, released "
                          "under CC BY-NC-SA 4.0")
    record = run_record(model_path)
    if record is None:
        raise LicenceUnknown(
            f"{model_path}: a model file without its run directory records no lineage, so ectune cannot tell whether "
            f"it derives from NVIDIA's EDM/EDM2 weights (CC BY-NC-SA 4.0); pass --license {MIT} or --license {CC_BY_NC_SA}")
    init = record.get("init")
    if init is None:
        return Provenance(MIT, f"trained by ectune from randomly initialised weights (`ectune {record['command']}` without --init)")
    if _depth >= _MAX_DEPTH:
        raise LicenceUnknown(f"{model_path}: the --init chain is longer than {_MAX_DEPTH} (a cycle?); pass --license")
    hub = parse_hub_ref(init)
    try:
        init_path = resolve_model_path(init)
        _, init_extra = read_model_meta(init_path)
    except ValueError as exc:  # CheckpointError, HubError
        raise LicenceUnknown(
            f"{model_path} was tuned from --init {init}, which cannot be read now ({exc}); ectune cannot tell whether "
            f"it derives from NVIDIA's EDM/EDM2 weights (CC BY-NC-SA 4.0): pass --license {MIT} or --license {CC_BY_NC_SA}"
        ) from None
    parent = provenance(init_path, init_extra, _depth=_depth + 1)
    return Provenance(parent.licence, f"tuned from {init}, which is {parent.licence}: {parent.reason}",
                      hub.repo_id if hub else parent.base_model)
