"""Save on a signal (--runtime.save-on-signal, docs/scaling.md#slurm): the state is saved at the images seen when the
signal came, the command stops with exit code 75, and rerunning finishes bit-identically to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from ectune.cli import main
from ectune.runtime.checkpoint import load_state
from ectune.training import loop
from ectune.training.signals import EXIT_INTERRUPTED, SaveOnSignal, TrainingInterrupted

from conftest import TINY, needs_fmnist, tiny


def assert_same_state(a_path, b_path):
    a, b = load_state(a_path), load_state(b_path)
    assert a["nimg"] == b["nimg"]
    for part in ("net", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


@needs_fmnist
def test_signal_saves_at_the_current_step_and_the_rerun_is_bit_exact(tmp_path, monkeypatch):
    # save_kimg far beyond the run: the only save before the end is the one the signal causes.
    cfg = tiny("tune", total_kimg=0.048, save_kimg=10.0, status_kimg=0.016)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    loop.train(cfg, straight, show_progress=False)
    before = signal.getsignal(signal.SIGUSR1)

    real_step = loop.training_step

    def step_then_signal(**kw):  # SIGUSR1 arrives during the step that starts at 16 images
        if kw["nimg"] == 16:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(**kw)

    monkeypatch.setattr(loop, "training_step", step_then_signal)
    with pytest.raises(TrainingInterrupted, match=r"SIGUSR1 received: saved the training state .*state\.pt at "
                                                  r"0\.032 kimg \(32 images\)") as exc:
        loop.train(cfg, stopped, show_progress=False)
    assert exc.value.nimg == 32 and load_state(stopped / "state.pt")["nimg"] == 32
    assert "SIGUSR1 received" in (stopped / "log.txt").read_text()
    assert not (stopped / "lock").exists() and signal.getsignal(signal.SIGUSR1) is before
    monkeypatch.undo()
    loop.train(cfg, stopped, show_progress=False)
    assert_same_state(straight / "state.pt", stopped / "state.pt")


def test_handlers_only_record_until_restored():
    got = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: got.append(("previous", s)))
    try:
        handlers = SaveOnSignal(("USR2",))
        os.kill(os.getpid(), signal.SIGUSR2)  # installed: only recorded
        assert handlers.received == signal.SIGUSR2 and handlers.requested() == signal.SIGUSR2 and not got
        handlers.restore()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == [("previous", signal.SIGUSR2)]
        assert SaveOnSignal(()).requested() == 0 and SaveOnSignal(("none",)).previous == {}
    finally:
        signal.signal(signal.SIGUSR2, previous)


@needs_fmnist
def test_a_signal_after_the_loop_left_goes_to_the_previous_handler(tmp_path, monkeypatch):
    """train() puts the previous handlers back however its loop ends (here: a step that raises), so a later signal
    reaches them and is never swallowed."""
    got = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: got.append(("previous", s)))
    try:
        def crashing_step(**kw):
            raise RuntimeError("a step that fails")

        monkeypatch.setattr(loop, "training_step", crashing_step)
        with pytest.raises(RuntimeError, match="a step that fails"):
            loop.train(tiny("pretrain", save_on_signal=("USR2",)), tmp_path / "run", show_progress=False)
        assert signal.getsignal(signal.SIGUSR2) is not None and not got
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == [("previous", signal.SIGUSR2)]
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize("given, expected", [(("USR1", "TERM"), ("USR1", "TERM")), (("usr1,SIGTERM",), ("USR1", "TERM")),
                                             (("none",), ()), ((), ()), (("HUP", "hup"), ("HUP",))])
def test_signal_names(given, expected):
    from ectune.config import signal_names

    assert signal_names(given) == expected


def test_bad_signal_name_is_one_clear_error(capsys):
    assert main(["pretrain", "--dry-run", "--runtime.save-on-signal", "USR1,KILL"]) == 1
    err = capsys.readouterr().err
    assert "--runtime.save-on-signal ('USR1,KILL',): expected signal names among USR1, USR2, TERM, INT, HUP" in err
    assert main(["pretrain", "--dry-run", "--runtime.save-on-signal", "USR1,TERM"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["runtime"]["save_on_signal"] == ["USR1,TERM"]


@needs_fmnist
@pytest.mark.slow
def test_sigusr1_to_the_cli_saves_exits_75_and_the_rerun_matches(tmp_path):
    """The documented flow: `ectune pretrain` gets SIGUSR1 mid-run, saves where it is and exits 75; the same
    command finishes the run, bit-identical to one that was never interrupted (all runs in subprocesses, 1 thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(run):
        return [sys.executable, "-m", "ectune.cli", "pretrain", "--run", str(run), *TINY, "--train.batch", "16",
                "--train.total-kimg", "0.32", "--runtime.status-kimg", "0.016", "--runtime.save-kimg", "100",
                "--runtime.sample-kimg", "0", "--quiet"]

    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    proc = subprocess.Popen(command(stopped), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (stopped / "stats.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    saved = load_state(stopped / "state.pt")["nimg"]
    assert 0 < saved < 320, saved  # saved mid-run: no interval save or end of run happened before
    assert f"saved the training state {stopped / 'state.pt'} at {saved / 1000:.3f} kimg ({saved} images)" in err
    last = json.loads((stopped / "stats.jsonl").read_text().splitlines()[-1])["kimg"]
    assert last * 1000 <= saved
    done = subprocess.run(command(stopped), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    starts = re.findall(r"starting at ([0-9.]+) kimg", (stopped / "log.txt").read_text())
    assert len(starts) == 2 and float(starts[1]) == pytest.approx(saved / 1000, abs=0.05)
    whole = subprocess.run(command(straight), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert_same_state(straight / "state.pt", stopped / "state.pt")


RANK_LAUNCHER = '''
import json, os, signal, sys
from ectune.cli import main
from ectune.training import loop

spec = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
real_step = loop.training_step

def step(**kw):  # only rank 1 gets the signal, during the step that starts at 16 images
    if rank == 1 and kw["nimg"] == 16:
        os.kill(os.getpid(), signal.SIGUSR1)
    return real_step(**kw)

loop.training_step = step
code = main(spec["argv"])
open(spec["codes"] + f".{rank}", "w").write(str(code))
sys.exit(0)
'''


@needs_fmnist
@pytest.mark.slow
def test_ranks_agree_to_stop_at_the_same_step(tmp_path):
    """Two gloo processes under torchrun; only rank 1 is signalled. Both stop after the same step (otherwise the
    other rank would wait forever in the next step's collectives), rank 0 saves there, and both return 75."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    argv = ["pretrain", "--run-dir", str(run), *TINY, "--train.batch", "16", "--train.total-kimg", "0.064",
            "--runtime.save-kimg", "100", "--runtime.sample-kimg", "0", "--quiet"]
    (tmp_path / "launch.py").write_text(RANK_LAUNCHER)
    spec = json.dumps({"argv": argv, "codes": str(tmp_path / "code")})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "sig",
                           str(tmp_path / "launch.py"), spec], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"code.{r}").read_text() for r in (0, 1)] == [str(EXIT_INTERRUPTED)] * 2
    assert load_state(run / "state.pt")["nimg"] == 32
    assert proc.stderr.count("SIGUSR1 received: saved the training state") == 1  # printed by rank 0 only


def test_slurm_script_is_valid_bash_with_the_requeue_recipe():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for needed in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "trap 'forward_and_requeue USR1' USR1",
                   'scontrol requeue "$SLURM_JOB_ID"', '--nnodes "$SLURM_NNODES"', "--rdzv-id \"$SLURM_JOB_ID\"",
                   "srun ", "--run-dir "):
        assert needed in text, needed
