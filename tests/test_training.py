"""Training loop: runs end to end on real Fashion-MNIST, resumes bit-exactly, survives crashes and bad input."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from ectune.cli import main
from ectune.runtime import checkpoint
from ectune.runtime.checkpoint import CheckpointError, load_state
from ectune.training.loop import train

from conftest import TINY, needs_fmnist, tiny

@needs_fmnist
def test_resume_is_bit_exact(tmp_path):
    cfg = tiny("tune", total_kimg=0.128)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight, show_progress=False)
    train(cfg, resumed, until_kimg=0.064, show_progress=False)
    assert load_state(resumed / "state.pt")["nimg"] == 64
    train(cfg, resumed, show_progress=False)
    a, b = load_state(straight / "state.pt"), load_state(resumed / "state.pt")
    assert a["nimg"] == b["nimg"] == 128
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


@needs_fmnist
def test_pretrain_tune_ict_sample_info_cli(tmp_path, capsys):
    dm, ecm, ict = tmp_path / "dm", tmp_path / "ecm", tmp_path / "ict"
    short = ["--train.total-kimg", "0.064", "--train.batch", "16", "--runtime.sample-kimg", "0.064", "--quiet",
             "--data.resolution", "32"]
    assert main(["pretrain", "--run", str(dm), *TINY, *short]) == 0
    assert (dm / "samples-heun.png").exists() and (dm / "loss.png").exists() and (dm / "stats.jsonl").exists()
    assert main(["tune", "--init", str(dm), "--run", str(ecm), "--data.split", "test", *short]) == 0
    assert (ecm / "samples-1step.png").exists() and (ecm / "samples-2step.png").exists()
    assert main(["tune", "--init", str(dm), "--objective", "ict", "--run", str(ict), "--data.split", "test", *short]) == 0
    capsys.readouterr()
    assert main(["info", str(ecm)]) == 0
    info = capsys.readouterr().out
    assert '"nimg": 64' in info and '"objective": "ect"' in info
    for out in ("g.png", "g.npz", "gdir"):
        assert main(["sample", str(ecm), "--steps", "2", "--mid-t", "0.821", "--n", "5", "--out", str(tmp_path / out)]) == 0
    assert len(list((tmp_path / "gdir").glob("*.png"))) == 5
    import numpy as np

    assert np.load(tmp_path / "g.npz")["arr_0"].shape == (5, 32, 32, 1)


def test_dry_run_prints_resolved_config_with_param_count(capsys):
    assert main(["tune", "--preset", "cifar10", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"params_millions": 55.7' in out and '"q": 2.0' in out and '"weighting": "inv_dt"' in out


def test_unknown_preset_and_option(capsys):
    assert main(["pretrain", "--preset", "nope", "--dry-run"]) == 1
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--dry-run", "--train.bogus", "1"])
    assert exc.value.code == 2


@pytest.mark.parametrize("path_kind", ["missing", "empty"])
def test_missing_or_empty_data_path(tmp_path, capsys, path_kind):
    path = tmp_path / "nothing"
    if path_kind == "empty":
        path.mkdir()
    code = main(["pretrain", "--run", str(tmp_path / "run"), *TINY[:-2], "--data.source", "edm", "--data.path", str(path)])
    assert code == 1
    assert str(path) in capsys.readouterr().err


@needs_fmnist
def test_init_errors(tmp_path, capsys):
    run = tmp_path / "dm"
    train(tiny("pretrain", total_kimg=0.032), run, show_progress=False)
    # 1. a pickle is refused and never executed
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil.write_bytes(pickle.dumps(Evil()))
    assert main(["tune", "--init", str(evil), "--run", str(tmp_path / "t1"), "--dry-run"]) == 1
    assert "never unpickles" in capsys.readouterr().err and not marker.exists()
    # 2. a file that is not an ectune model
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a model")
    assert main(["tune", "--init", str(junk), "--run", str(tmp_path / "t2"), "--dry-run"]) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    # 3. a truncated model export
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((run / "model.safetensors").read_bytes()[:-100])
    assert main(["tune", "--init", str(cut), "--run", str(tmp_path / "t3"), "--data.split", "test"]) == 1
    assert "cut.safetensors" in capsys.readouterr().err
    # 4. channel mismatch between the --init model and the data (RGB images vs a grayscale model)
    from PIL import Image

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(rgb / f"{i}.png")
    assert main(["tune", "--init", str(run), "--run", str(tmp_path / "t4"), "--data.source", "edm", "--data.path", str(rgb),
                 "--data.resolution", "0", "--data.no-use-labels"]) == 1
    err = capsys.readouterr().err
    assert "3×32×32" in err and "1×32×32" in err


@needs_fmnist
def test_truncated_state_and_config_conflict(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--run", str(run), *TINY, "--train.total-kimg", "0.032", "--train.batch", "16", "--quiet"]
    assert main(args) == 0
    assert main(args[:-1] + ["--train.batch", "32", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "train.batch" in err and "different config" in err
    state = run / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert main(args) == 1
    assert "state.pt is not a readable ectune training state" in capsys.readouterr().err


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    checkpoint.save_state(target, {"nimg": 1, "w": torch.ones(3)})
    before = target.read_bytes()

    def full_disk(state, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="disk full while writing .*state.pt; the previous file"):
        checkpoint.save_state(target, {"nimg": 2})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert load_state(target)["nimg"] == 1
    with pytest.raises(CheckpointError):
        checkpoint.load_model_weights(target)


@needs_fmnist
@pytest.mark.slow
def test_kill_dash_nine_then_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ectune.cli", "pretrain", "--run", str(run), *TINY, "--train.batch", "16",
           "--train.total-kimg", "0.64", "--runtime.save-kimg", "0.064", "--runtime.sample-kimg", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_state(run / "state.pt")["nimg"]
    assert 0 < saved < 640
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"starting at {saved / 1000:g} kimg" in (run / "log.txt").read_text()
    assert load_state(run / "state.pt")["nimg"] == 640


@needs_fmnist
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = tiny("tune", total_kimg=0.032, save_kimg=0.032)
    two = replace(one, train=replace(one.train, accum=2))
    train(one, tmp_path / "a", show_progress=False)
    train(two, tmp_path / "b", show_progress=False)
    a, b = load_state(tmp_path / "a" / "state.pt")["net"], load_state(tmp_path / "b" / "state.pt")["net"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


# ---------------------------------------------------------------------------------------------- run ownership


@needs_fmnist
def test_run_directory_is_owned_by_one_process(tmp_path, capsys):
    import json
    import socket

    run = tmp_path / "run"
    args = ["pretrain", "--run", str(run), *TINY, "--train.total-kimg", "0.032", "--train.batch", "16", "--quiet"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / "lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"in use by process {holder.pid}" in err and str(run / "lock") in err
        assert not (run / "config.json").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock is taken over, with a note
    assert f"taking over {run / 'lock'} (process {holder.pid} no longer runs)" in capsys.readouterr().err
    assert not (run / "lock").exists()  # released when the command ends


@needs_fmnist
def test_a_state_from_another_run_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["pretrain", *TINY, "--train.total-kimg", "0.032", "--train.batch", "16", "--quiet"]
    assert main([*common, "--run", str(a)]) == 0
    assert main([*common, "--run", str(b), "--train.seed", "1", "--until-kimg", "0.016"]) == 0
    (b / "state.pt").write_bytes((a / "state.pt").read_bytes())
    assert main([*common, "--run", str(b), "--train.seed", "1"]) == 1
    assert f"{b / 'state.pt'} belongs to another run" in capsys.readouterr().err


@needs_fmnist
def test_failed_start_does_not_bind_the_run_and_temporaries_are_cleared(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["pretrain", "--run", str(run), *TINY, "--train.total-kimg", "0.032", "--train.batch", "16", "--quiet"]
    assert main([*common, "--data.source", "idx", "--data.path", str(tmp_path / "typo")]) == 1
    assert "typo" in capsys.readouterr().err
    (run / ".state.pt.x1y2.tmp").write_bytes(b"half a save")
    old_umask = os.umask(0o027)
    try:
        assert main(common) == 0  # the corrected command: not refused as a "different config"
    finally:
        os.umask(old_umask)
    assert not list(run.glob(".*.tmp"))
    for name in ("config.json", "state.pt", "model.safetensors"):
        assert (run / name).stat().st_mode & 0o777 == 0o640, name  # 0o666 under the umask, as open() would


def test_empty_or_partial_state_gives_one_message(tmp_path):
    empty, partial = tmp_path / "empty.pt", tmp_path / "partial.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is not a readable ectune training state"):
        load_state(empty, required=("net",))
    checkpoint.save_state(partial, {"net": {}, "nimg": 3})
    with pytest.raises(CheckpointError, match=r"partial\.pt is an incomplete training state \(missing opt, ema\)"):
        load_state(partial, required=("net", "opt", "ema", "nimg"))
