"""The quality measurements a run recorded, with their protocol, for a model card.

Two sources: `ectune eval` results (eval-*.json beside the model) and the periodic evaluation of training (records
with a `metric_value` in stats.jsonl; only the latest is kept). Each becomes one `Measurement` per sampler setting,
with the number of samples, the steps and the reference set, and the images seen when it was measured: a result
measured before the exported weights were saved is marked as such, never passed off as theirs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measurement:
    metric: str  # report name: "FD-Lite0", "FID", "FD-DINOv2"
    sampler: str  # "consistency" or "heun"
    steps: int
    nfe: int
    n: int  # samples
    value: float
    reference: str  # what the samples were compared with
    kimg: float | None  # images seen by the evaluated weights, in thousands
    source: str  # the file it was read from
    mid_t: tuple[float, ...] = ()
    seeds: tuple[int, int] | None = None  # first and last seed

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _eval_file(path: Path) -> list[Measurement]:
    try:
        data = json.loads(path.read_text())
        ref = data.get("reference") or {}
        reference = f"{ref.get('data', 'training data')}, {ref.get('split', 'train')} split, {ref.get('count', '?')} images"
        out = []
        for row in data["results"]:
            if row.get("fd") is None:
                continue
            out.append(Measurement(
                metric=str(data.get("metric_name", data.get("metric", "FD"))), sampler=str(row["method"]),
                steps=int(row["steps"]), nfe=int(row["nfe"]), n=int(data["n"]), value=float(row["fd"]),
                reference=reference, kimg=data.get("kimg"), source=path.name,
                mid_t=tuple(float(t) for t in (row.get("mid_t") or ())) if int(row["steps"]) > 1 and row["method"] == "consistency" else (),
                seeds=tuple(data["seeds"]) if data.get("seeds") else None))
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not an ectune eval result (or a damaged one): a card never fails on it


def _training_evals(stats: Path, *, split: str, mid_t: tuple[float, ...], heun_steps: int) -> list[Measurement]:
    from ..evaluation import TRAINING_EVAL_SEED

    last = None
    try:
        for line in stats.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and "metric_value" in row:
                last = row
    except OSError:
        return []
    if last is None:
        return []
    n = int(last.get("eval_n", 0))
    out = []
    for key, value in last.items():
        if not key.startswith("fd_") or value is None:
            continue
        label = key[3:]
        heun = label == "heun"
        steps = heun_steps if heun else int(label.removesuffix("step"))
        out.append(Measurement(
            metric=str(last.get("metric_name", "FD")), sampler="heun" if heun else "consistency", steps=steps,
            nfe=2 * steps - 1 if heun else steps, n=n, value=float(value), reference=f"training data, {split} split", kimg=last.get("kimg"),
            source=f"{stats.name} (evaluation during training)", mid_t=mid_t[: steps - 1] if steps > 1 and not heun else (),
            seeds=(TRAINING_EVAL_SEED, TRAINING_EVAL_SEED + n - 1) if n else None))
    return out


def recorded_metrics(model_path: Path, *, split: str = "train", mid_t: tuple[float, ...] = (),
                     heun_steps: int = 18) -> list[Measurement]:
    """Every measurement found beside the model (a run directory, or the folder of a model file)."""
    folder = model_path if model_path.is_dir() else model_path.parent
    found: list[Measurement] = []
    for path in sorted(folder.glob("eval-*.json")):
        found.extend(_eval_file(path))
    found.extend(_training_evals(folder / "stats.jsonl", split=split, mid_t=mid_t, heun_steps=heun_steps))
    return found
