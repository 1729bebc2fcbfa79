"""Trackers (--runtime.tensorboard, --runtime.wandb): what they received is read back with TensorBoard's own event
reader and from the W&B offline run file, and compared with stats.jsonl and the sample-grid PNGs on disk."""

from __future__ import annotations

import glob
import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from ectune.training.report import Reporter
from ectune.training.trackers import open_trackers

from conftest import needs_fmnist, tiny

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:  # pragma: no cover - the test extra installs it
    EventAccumulator = None
try:
    from wandb.proto import wandb_internal_pb2
except ImportError:  # pragma: no cover
    wandb_internal_pb2 = None

needs_tensorboard = pytest.mark.skipif(EventAccumulator is None, reason="tensorboard not installed (ectune[tensorboard])")
needs_wandb = pytest.mark.skipif(wandb_internal_pb2 is None, reason="wandb not installed (ectune[wandb])")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without network: offline mode, quiet, its files and settings under tmp_path."""
    folder = tmp_path / "wandb-files"
    folder.mkdir()
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(folder), WANDB_CONFIG_DIR=str(folder),
                     WANDB_CACHE_DIR=str(folder), WANDB_DATA_DIR=str(folder), WANDB_DISABLE_GIT="true").items():
        monkeypatch.setenv(k, v)
    return folder


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb run file: a 7-byte header, then LevelDB-style log blocks of 32 KiB whose chunks
    (crc32, length, type 1 full / 2 first / 3 middle / 4 last) hold serialised `Record` protobufs."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def pixels(image_file) -> list:
    """An image's pixels as a grayscale H×W list (Fashion-MNIST grids; TensorBoard stores them as RGB)."""
    from PIL import Image

    a = np.asarray(Image.open(image_file))
    if a.ndim == 3:
        assert (a == a[:, :, :1]).all()
        a = a[:, :, 0]
    return a.tolist()


def history_rows(records) -> list[dict]:
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@needs_fmnist
@needs_tensorboard
@needs_wandb
def test_tensorboard_and_wandb_get_the_stats_and_sample_grids(tmp_path, wandb_offline):
    run = tmp_path / "project-x" / "run-a"
    cfg = tiny("tune", total_kimg=0.032, status_kimg=0.016, sample_kimg=0.032, tensorboard=True, wandb=True)
    from ectune.training.loop import train

    train(cfg, run, show_progress=False)
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["kimg"] for s in stats] == [0.016, 0.032]
    # An evaluation during a later invocation of the same run (what the loop hands Reporter.metric).
    reporter = Reporter(run, total_kimg=0.032, start_kimg=0.032, progress=False, cfg=cfg)
    reporter.metric({"kimg": 0.032, "metric_name": "fd_lite0", "metric_value": 123.5, "fd_lite0": 123.5, "n": 16})
    reporter.close()

    # TensorBoard: scalars at steps = images seen, equal to stats.jsonl (float32); grids equal to the PNGs.
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/r_over_t", "mean_r_over_t"),
                     ("train/stage", "stage"), ("perf/img_per_s", "img_per_s"), ("perf/mem_gb", "mem_gb"),
                     ("perf/sec_per_kimg", "sec_per_kimg"), ("train/skipped_steps", "skipped_steps")]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [16, 32], tag
        assert [e.value for e in events] == pytest.approx([float(np.float32(s[key])) for s in stats], rel=1e-6), tag
    assert [(e.step, e.value) for e in acc.Scalars("eval/fd_lite0")] == [(32, 123.5)]
    assert [e.value for e in acc.Scalars("eval/n")] == [16.0]
    for name in ("1step", "2step"):
        (event,) = acc.Images(f"samples/{name}")
        assert event.step == 32 and (event.width, event.height) == (256, 256), name
        assert pixels(io.BytesIO(event.encoded_image_string)) == pixels(run / "samples" / f"{name}-000000.png"), name

    # W&B: one offline run id, kept in the run directory, used by both invocations.
    run_id = (run / "wandb-id.txt").read_text().strip()
    dirs = sorted(glob.glob(str(wandb_offline / "wandb" / "offline-run-*")))
    assert len(dirs) == 2 and all(d.endswith(f"-{run_id}") for d in dirs)
    first = read_wandb_records(Path(dirs[0]) / f"run-{run_id}.wandb")
    (meta,) = [r.run for r in first if r.WhichOneof("record_type") == "run"]
    assert (meta.run_id, meta.project, meta.display_name) == (run_id, "project-x", "run-a")
    rows = history_rows(first)
    losses = [(r["kimg"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(s["kimg"], s["loss"]) for s in stats]  # JSON floats: exact
    assert [r["train/stage"] for r in rows if "train/stage" in r] == [s["stage"] for s in stats]
    images = [r for r in rows if "samples/1step/path" in r]  # an image is logged as {path, width, ...}
    assert len(images) == 1 and images[0]["kimg"] == 0.032 and images[0]["samples/1step/width"] == 256
    media = Path(dirs[0]) / "files" / images[0]["samples/1step/path"]
    assert pixels(media) == pixels(run / "samples" / "1step-000000.png")
    second = history_rows(read_wandb_records(Path(dirs[1]) / f"run-{run_id}.wandb"))
    assert [(r["kimg"], r["eval/fd_lite0"]) for r in second if "eval/fd_lite0" in r] == [(0.032, 123.5)]


def test_other_ranks_and_switched_off_trackers_write_nothing(tmp_path):
    cfg = tiny("tune", tensorboard=True, wandb=True)
    reporter = Reporter(tmp_path, total_kimg=1, start_kimg=0, enabled=False, progress=False, cfg=cfg)
    reporter.status(dict(kimg=0.016, loss=1.0, stage=1, mean_r_over_t=0.5, lr=1e-4, sec_per_kimg=1.0, img_per_s=1.0,
                         mem_gb=0.0, skipped_steps=0))
    reporter.images(0.016, {"1step": tmp_path / "missing.png"})
    reporter.close()
    assert list(tmp_path.iterdir()) == []
    assert open_trackers(tiny("tune"), tmp_path).trackers == []


@pytest.mark.parametrize("module, switch, extra", [("torch.utils.tensorboard", "tensorboard", "tensorboard"),
                                                   ("wandb", "wandb", "wandb")])
def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, module, switch, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=rf"--runtime\.{switch} needs the {extra} package: "
                                           rf"pip install 'ectune\[{extra}\]'"):
        open_trackers(tiny("tune", **{switch: True}), tmp_path)
    assert not (tmp_path / "wandb-id.txt").exists()
