"""Experiment trackers (docs/usage.md#trackers): TensorBoard and Weights & Biases, fed by the Reporter from the same
records as stats.jsonl (status lines, evaluations) and with the sample grids, on rank 0 only.

Each tracker has three methods: `log_scalars(step_kimg, {name: value})`, `log_image(name, step_kimg, image)` (an
HxWxC or HxW uint8 array, or a PNG path) and `close()`. Both packages are optional extras, imported only when their
switch is on (`--runtime.tensorboard`, `--runtime.wandb`).
"""

from __future__ import annotations

import atexit
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import RunConfig, to_dict
from ..runtime.checkpoint import atomic_write_text

WANDB_ID_FILE = "wandb-id.txt"  # in the run directory: a resumed run logs to the same W&B run


class TrackerMissing(RuntimeError):
    """A tracker was switched on but its package is not installed."""


class Tracker(Protocol):
    def log_scalars(self, step_kimg: float, scalars: dict[str, float]) -> None: ...

    def log_image(self, name: str, step_kimg: float, image: np.ndarray | Path) -> None: ...

    def close(self) -> None: ...


def status_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """A status record of stats.jsonl under the names the trackers show."""
    names = {"loss": "train/loss", "lr": "train/lr", "mean_r_over_t": "train/r_over_t", "stage": "train/stage",
             "skipped_steps": "train/skipped_steps", "img_per_s": "perf/img_per_s",
             "sec_per_kimg": "perf/sec_per_kimg", "mem_gb": "perf/mem_gb"}
    return {names[k]: float(v) for k, v in stats.items() if k in names and _number(v)}


def metric_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An evaluation record ({'kimg', 'metric_name', 'metric_value', 'fd_<label>': ...}) as eval/<name> values."""
    out = {f"eval/{record['metric_name']}": float(record["metric_value"])}
    out.update({f"eval/{k}": float(v) for k, v in record.items()
                if k not in ("kimg", "metric_name", "metric_value") and _number(v)})
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_array(image: np.ndarray | Path | str) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    image = np.asarray(image)
    return image[:, :, None] if image.ndim == 2 else image


class Trackers:
    """All trackers the config switches on, behind the one interface (none: every call does nothing)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_scalars(self, step_kimg: float, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.log_scalars(step_kimg, scalars)

    def log_image(self, name: str, step_kimg: float, image: np.ndarray | Path) -> None:
        for t in self.trackers:
            t.log_image(name, step_kimg, image)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def open_trackers(cfg: RunConfig | None, run_dir: Path) -> Trackers:
    """The trackers `cfg.runtime` switches on, writing for the run in `run_dir` (call on rank 0 only)."""
    if cfg is None:
        return Trackers([])
    out: list[Tracker] = []
    if cfg.runtime.tensorboard:
        out.append(TensorBoardTracker(run_dir / "tensorboard"))
    if cfg.runtime.wandb:
        out.append(WandbTracker(run_dir, cfg))
    return Trackers(out)


class TensorBoardTracker:
    """Event files in `log_dir` (RUN/tensorboard); the step is the number of images seen."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackerMissing("--runtime.tensorboard needs the tensorboard package: "
                                 "pip install 'ectune[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30)
        atexit.register(self.close)  # a run that stops on an error still flushes what it logged

    def log_scalars(self, step_kimg: float, scalars: dict[str, float]) -> None:
        step = round(step_kimg * 1000)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def log_image(self, name: str, step_kimg: float, image: np.ndarray | Path) -> None:
        self.writer.add_image(name, _as_array(image), round(step_kimg * 1000), dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A W&B run: project = --runtime.wandb-project or the run directory's parent folder name, name = the run
    directory's name, id kept in RUN/wandb-id.txt so that a resumed run continues it. Files go to $WANDB_DIR or
    the run directory; the x axis of every chart is `kimg`."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise TrackerMissing("--runtime.wandb needs the wandb package: pip install 'ectune[wandb]'") from exc
        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
        root = run_dir.resolve()
        self.run = wandb.init(
            project=cfg.runtime.wandb_project or root.parent.name or "ectune", name=root.name, id=run_id,
            resume="allow", mode=cfg.runtime.wandb_mode, dir=os.environ.get("WANDB_DIR") or str(run_dir),
            config=to_dict(cfg), reinit="finish_previous",
            settings=wandb.Settings(console="off"),  # log.txt has the console; leave stdout alone
        )
        self.run.define_metric("kimg")
        self.run.define_metric("*", step_metric="kimg")

    def log_scalars(self, step_kimg: float, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "kimg": step_kimg})

    def log_image(self, name: str, step_kimg: float, image: np.ndarray | Path) -> None:
        array = _as_array(image)
        self.run.log({name: self.wandb.Image(array[:, :, 0] if array.shape[2] == 1 else array), "kimg": step_kimg})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
