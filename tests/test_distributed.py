"""Multi-process training through real torchrun (gloo, CPU) equals one process with the same global batch.

One torchrun launch (2 processes, c10d rendezvous as in docs/scaling.md) runs, in order: diffusion pretraining,
an ECT tune with dropout > 0 (keyed dropout + the r > 0 subset target pass under DDP), and seed-split sampling
gathered back with `all_gather_cat`. The same work on one process must give the same weights, EMA and samples.

Tolerance: the two runs do the same maths except the gradient sum: one process sums all 16 per-sample gradients
in one backward pass; two processes each sum 8 and gloo adds the halves (then averages), so float32 additions
happen in a different order (~1e-7 relative per add). After 4 RAdam steps we measured max |Δ| of 1.2e-7 (weights)
and 7e-9 (EMA) for pretraining, 3.5e-8 / 2e-10 for the tune. We allow atol = rtol = 1e-5: ~100× the measured
differences, and ~1000× below a real change of the step (the same 64 images in batches of 8 instead of 16 move
the weights by 8.5e-3), so a rank on the wrong rows or a mismatched dropout mask cannot pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ectune.cli import main
from ectune.data.idx import fashion_mnist_dirs
from ectune.runtime.checkpoint import load_state
from ectune.runtime.distributed import all_gather_cat, rank_seeds

HAVE_FMNIST = any((d / "t10k-images-idx3-ubyte.gz").exists() for d in fashion_mnist_dirs())
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed")

TINY = ["--net.model-channels", "16", "--net.channel-mult", "1", "2", "--net.num-blocks", "1",
        "--net.attn-resolutions", "8", "--data.split", "test", "--train.batch", "16", "--train.total-kimg", "0.064",
        "--runtime.status-kimg", "0.032", "--runtime.sample-kimg", "0", "--quiet"]
# augment_dim 9 as in the public EDM CIFAR-10 checkpoints: its mapping layer gets no gradient in ECT, which DDP
# must be told about (it used to fail on the second step).
PRETRAIN = ["pretrain", *TINY, "--net.augment-dim", "9"]
TUNE = ["tune", *TINY, "--net.dropout", "0.2"]
SEEDS = 10  # not a multiple of the world size: the rank slices have unequal lengths
ATOL = RTOL = 1e-5

LAUNCHER = textwrap.dedent('''
    """Run by torchrun on every rank. The ectune arguments live here, not on torchrun's command line, so this
    test does not depend on how torchrun's own parser treats them."""
    import json, sys
    import torch
    import torch.distributed as dist
    from ectune.cli import main
    from ectune.model import load_model, sample_images
    from ectune.runtime.distributed import all_gather_cat, check_same_across_ranks, rank_seeds, shutdown

    spec = json.loads(sys.argv[1])
    # This process runs several commands, so it owns the group (a command that joins the group leaves it).
    dist.init_process_group("gloo")
    for argv in spec["commands"]:
        if main(argv) != 0:
            sys.exit(f"rank {dist.get_rank()}: {argv[0]} failed")
    model, cfg, _ = load_model(spec["model"])
    seeds = rank_seeds(torch.arange(spec["seeds"]), dist.get_rank(), dist.get_world_size())
    images = all_gather_cat(sample_images(model, cfg, seeds, steps=1))
    try:  # ranks that resumed from different states must stop with one clear error
        check_same_across_ranks(dist.get_rank(), what="images seen")
        disagreement = None
    except RuntimeError as exc:
        disagreement = str(exc)
    if dist.get_rank() == 0:
        torch.save(images, spec["samples"])
        open(spec["disagreement"], "w").write(disagreement or "no error")
    shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, spec: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id", "ectune-test",
           str(script), json.dumps(spec)]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)


def _assert_close(a: dict, b: dict, what: str) -> float:
    assert a.keys() == b.keys(), what
    worst = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {k}: {m}")
        if a[k].is_floating_point():
            worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst


def _check_rank0_only_files(one: Path, two: Path) -> None:
    """The 2-process run wrote exactly the files of the 1-process run, each once (no rank-1 duplicates)."""
    files = lambda d: sorted(str(f.relative_to(d)) for f in d.rglob("*") if f.is_file())  # noqa: E731
    assert files(two) == files(one)
    log = (two / "log.txt").read_text().splitlines()
    assert len(log) == len(set(log)) == len((one / "log.txt").read_text().splitlines())
    assert "2 process(es)" in log[0]
    stats = [json.loads(line) for line in (two / "stats.jsonl").read_text().splitlines()]
    assert [s["kimg"] for s in stats] == [0.032, 0.064]


@needs_fmnist
def test_two_processes_equal_one(tmp_path: Path) -> None:
    one_pre, one_tune, two_pre, two_tune = (tmp_path / n for n in ("1-pretrain", "1-tune", "2-pretrain", "2-tune"))
    assert main([*PRETRAIN, "--run", str(one_pre)]) == 0
    init = ["--init", str(one_pre / "model.safetensors")]  # both tunes start from the same weights
    spec = dict(commands=[[*PRETRAIN, "--run", str(two_pre)], [*TUNE, *init, "--run", str(two_tune)],
                          ["sample", str(two_tune), "--n", str(SEEDS), "--out", str(tmp_path / "cli-2.npz")]],
                model=str(two_tune), seeds=SEEDS, samples=str(tmp_path / "samples-2.pt"),
                disagreement=str(tmp_path / "disagreement.txt"))
    proc = _torchrun(tmp_path, spec)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main([*TUNE, *init, "--run", str(one_tune)]) == 0

    report = {}
    for name, one, two in (("pretrain", one_pre, two_pre), ("tune", one_tune, two_tune)):
        a, b = load_state(one / "state.pt"), load_state(two / "state.pt")  # torch.load(weights_only=True)
        assert a["nimg"] == b["nimg"] == 64
        report[f"{name} net"] = _assert_close(a["net"], b["net"], f"{name} net")
        report[f"{name} ema"] = _assert_close(a["ema"], b["ema"], f"{name} ema")
        _check_rank0_only_files(one, two)
    # The tune really ran ECT's target pass (r > 0 for part of the batch) with dropout on.
    stats = [json.loads(line) for line in (two_tune / "stats.jsonl").read_text().splitlines()]
    assert all(s["mean_r_over_t"] > 0 for s in stats)
    assert json.loads((two_tune / "config.json").read_text())["config"]["net"]["dropout"] == 0.2

    from ectune.model import load_model, sample_images

    model, cfg, _ = load_model(one_tune)
    torch.testing.assert_close(torch.load(tmp_path / "samples-2.pt", weights_only=True),
                               sample_images(model, cfg, torch.arange(SEEDS), steps=1), atol=1e-4, rtol=1e-4)
    # `ectune sample` under torchrun: each rank sampled its slice of the seeds, rank 0 wrote them all in order.
    import numpy as np

    from ectune.sampling import to_uint8

    cli = torch.from_numpy(np.load(tmp_path / "cli-2.npz")["arr_0"]).permute(0, 3, 1, 2)
    single = to_uint8(sample_images(model, cfg, torch.arange(SEEDS), steps=1))
    assert cli.shape == single.shape and (cli.int() - single.int()).abs().max() <= 1
    assert (tmp_path / "disagreement.txt").read_text().startswith("ranks disagree on the images seen: rank 0 has 0")
    print("max |1-process - 2-process|:", report)


@needs_fmnist
def test_cli_under_torchrun_exits_cleanly(tmp_path: Path) -> None:
    """The user's path: each command its own torchrun job. The command leaves the process group itself, so no
    rank aborts at interpreter exit after the work is done (which torchrun would report as a failed run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "ectune.cli",
           *PRETRAIN, "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_rank_seeds_partition_in_order() -> None:
    seeds = torch.arange(100, 111)
    for world in (1, 2, 3, 4, 16):
        parts = [rank_seeds(seeds, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), seeds)
        assert max(p.numel() for p in parts) - min(p.numel() for p in parts) <= 1
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        rank_seeds(seeds, 2, 2)


def test_all_gather_cat_without_process_group_is_identity() -> None:
    x = torch.arange(6).reshape(3, 2)
    assert all_gather_cat(x) is x


@pytest.mark.parametrize("preset, millions", [("imagenet64-s", 280.2), ("imagenet64-m", 497.8),
                                              ("imagenet64-l", 777.5), ("imagenet64-xl", 1119.3)])
def test_imagenet64_presets_have_the_paper_sizes(preset: str, millions: float, capsys: pytest.CaptureFixture) -> None:
    for command in ("tune", "pretrain"):
        assert main([command, "--preset", preset, "--dry-run"]) == 0  # built on the meta device: no memory
        info = json.loads(capsys.readouterr().out)
        assert info["params_millions"] == millions and info["config"]["net"]["arch"] == "edm2"


@needs_fmnist
@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path: Path, arch: str) -> None:
    from dataclasses import replace

    from ectune.training.loop import train
    from test_training import tiny

    cfg = tiny("tune", total_kimg=0.032)  # ECT from scratch, dropout 0.1: the recomputation must redraw the same mask
    if arch == "edm2":
        cfg = replace(cfg, net=replace(cfg.net, arch="edm2", attn_resolutions=(16,), dropout_res=16))
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    train(cfg, plain, show_progress=False)
    train(replace(cfg, net=replace(cfg.net, checkpointing=True)), ckpt, show_progress=False)
    a, b = load_state(plain / "state.pt"), load_state(ckpt / "state.pt")
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
