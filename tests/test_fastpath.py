"""The fast path's machinery on the CPU: the device-side non-finite guard, one-graph tracing of f_θ under
torch.compile, the compiled step's graphs, throughput.py without a GPU, the step-anatomy counts, and the compiled
step's Triton kernels built for an H100 without one. The same code on a GPU: tests/test_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ectune.model import build_model
from ectune.nets import SMALL_CONFIGS, build_net, count_params
from ectune.objectives import loss_spec
from ectune.presets import get_preset
from ectune.runtime import distributed as rt_dist
from ectune.training import fastpath, loop, step
from ectune.training.fastpath import FastPath, guard_mode, target_pass_rows
from ectune.training.guard import DeviceStepGuard, StepFlag, make_state_capturable
from ectune.training.step import make_optimizer, training_step

from conftest import last_stage_nimg, load_benchmark, opt_state_snapshot, random_data, small_cfg, with_fields

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("kind", ["radam", "adam", "adam-fused"])
def test_device_guard_matches_plain_step_and_skips_bad_steps(kind):
    torch.manual_seed(0)
    net_a = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    net_b = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    net_b.load_state_dict(net_a.state_dict())

    def make(net):
        if kind == "radam":
            return torch.optim.RAdam(net.parameters(), lr=1e-2, foreach=True)
        return torch.optim.Adam(net.parameters(), lr=1e-2, fused=kind == "adam-fused")

    opt_a, opt_b = make(net_a), make(net_b)
    guard = DeviceStepGuard(net_b.parameters())
    x = torch.randn(9, 5)
    for i in range(8):  # rho_t > 5 from step 6 on: RAdam's adaptive branch is covered too
        bad = i in (1, 4)
        opt_a.zero_grad(set_to_none=True)
        guard.zero_grads()
        la, lb = net_a(x).square().sum(), net_b(x).square().sum()
        la.backward()
        if bad:
            lb = lb * float("nan")
        lb.backward()
        assert guard.grads_attached()  # autograd accumulated into the flat buffer
        before = opt_state_snapshot(opt_b, list(net_b.parameters()))
        flag = guard.step(opt_b, lb.detach())
        assert isinstance(flag, StepFlag) and bool(flag) is (not bad)
        if bad:
            after = opt_state_snapshot(opt_b, list(net_b.parameters()))
            assert len(after) == len(before) and all(torch.equal(u, v) for u, v in zip(before, after))
        else:
            opt_a.step()
            for pa, pb in zip(net_a.parameters(), net_b.parameters()):
                assert torch.equal(pa, pb)
    assert guard.sync_steps <= 1  # only the non-fused optimisers' first step (no state yet) reads the host


def test_device_guard_grad_clip_matches_reference():
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    ref = nn.Linear(4, 4)
    ref.load_state_dict(net.state_dict())
    opt, opt_ref = torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    guard = DeviceStepGuard(net.parameters())
    guard.zero_grads()
    x = torch.randn(3, 4) * 100
    (net(x).square().sum()).backward()
    ref(x).square().sum().backward()
    grads = [p.grad for p in ref.parameters()]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(1.0 / (norm + 1e-6), max=1.0))
    opt_ref.step()
    assert bool(guard.step(opt, torch.zeros(()), grad_clip=1.0))
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_make_state_capturable_is_cuda_only():
    opt = torch.optim.RAdam([nn.Parameter(torch.zeros(3))])
    assert make_state_capturable(opt, torch.device("cpu")) is False
    assert opt.param_groups[0]["capturable"] is False


def tiny_train_cfg(**train_kw):
    cfg = get_preset("fashion-mnist", "tune")
    net = replace(SMALL_CONFIGS["tiny"], model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                  dropout=0.1)
    t = dict(total_kimg=0.064, batch=8, status_kimg=0.032, save_kimg=0.064, sample_kimg=0.0)
    return with_fields(replace(cfg, net=net), **{**t, **train_kw})


def run_steps(cfg, guard: str, steps: int, poison_step: int = -1):
    device = torch.device("cpu")
    data = random_data(cfg, 32)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = make_optimizer(cfg, list(model.net.parameters()), device)
    spec = loss_spec(cfg.objective, data_dim=cfg.net.img_resolution**2, sigma_data=0.5)
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=device, guard=guard)
    nimg, flags, losses = last_stage_nimg(cfg), [], []
    p0 = next(model.net.parameters())
    for i in range(steps):
        hook = p0.register_hook(lambda g: g * float("nan")) if i == poison_step else None
        before = opt_state_snapshot(opt, list(model.net.parameters()))
        result = training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=rt_dist.Dist())
        loss_sum, flag = result.loss_sum, result.kept
        if hook is not None:
            hook.remove()
            after = opt_state_snapshot(opt, list(model.net.parameters()))
            assert all(torch.equal(u, v) for u, v in zip(before, after)), "a bad step changed the state"
            assert float(loss_sum) == 0.0
        flags.append(bool(flag))
        losses.append(float(loss_sum))
        nimg += cfg.train.batch
    return model, fast.step_guard(opt), flags, losses


def test_training_step_device_guard_equals_sync_guard_on_cpu():
    cfg = tiny_train_cfg()
    m_sync, _, f_sync, l_sync = run_steps(cfg, "sync", 4, poison_step=2)
    m_dev, guard, f_dev, l_dev = run_steps(cfg, "device", 4, poison_step=2)
    assert f_sync == f_dev == [True, True, False, True]
    assert l_sync == l_dev
    for (k, a), b in zip(m_sync.net.state_dict().items(), m_dev.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert guard.sync_steps == 1  # RAdam's first step only (on the CPU its counter is host-side)


def test_training_step_rejects_unknown_guard():
    with pytest.raises(ValueError, match="guard must be"):
        guard_mode("maybe", torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="single-process"):
        guard_mode("device", torch.device("cpu"), 2)
    assert guard_mode("auto", torch.device("cpu"), 1) == "sync"
    assert guard_mode("auto", torch.device("cuda"), 1) == "device"
    assert guard_mode("auto", torch.device("cuda"), 2) == "sync"


def test_train_counts_and_stops_on_bad_steps_with_device_guard(tmp_path, monkeypatch):
    """train() consumes StepFlags like bools: bad steps are counted and it stops after max_bad_steps in a row."""
    from ectune.data import ImageDataset

    monkeypatch.setattr(fastpath, "guard_mode", lambda guard, device, world: "device")
    real_loss = step.consistency_loss
    monkeypatch.setattr(step, "consistency_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    imgs = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(loop, "open_dataset", lambda cfg: ImageDataset(
        torch.nn.functional.pad(imgs, (2, 2, 2, 2)).contiguous(), None, 0, "random 1x32x32"))
    cfg = tiny_train_cfg(max_bad_steps=3, total_kimg=0.08)
    with pytest.raises(loop.TrainingError, match="3 consecutive steps"):
        loop.train(cfg, tmp_path / "run", show_progress=False)


def test_perf_helpers_on_cpu():
    measure = load_benchmark("measure")
    matmul_peak_tflops, forward_flops = measure.matmul_peak_tflops, measure.forward_flops
    assert matmul_peak_tflops("cpu", n=64, iters=2, warmup=1) > 0
    lin = nn.Linear(8, 4, bias=False)
    assert forward_flops(lin, torch.randn(3, 8)) == 2 * 3 * 8 * 4
    flag = StepFlag(torch.tensor(False))
    assert flag.ready() and not bool(flag)


def test_throughput_no_cuda_message():
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "no CUDA device" in out.stdout


@pytest.mark.slow
def test_throughput_allow_cpu_runs_every_mode(tmp_path):
    if HAS_CUDA:
        pytest.skip("--allow-cpu only chooses the CPU where there is no CUDA device")
    log = tmp_path / "t.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--allow-cpu", "--out", str(log),
                          "--profile", str(tmp_path / "prof")],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    recs = {r["mode"]: r for r in map(json.loads, log.read_text().splitlines())}
    for mode in ("fp32", "bf16", "fast"):
        r = recs[mode]
        assert r["img_per_s"] > 0 and 0 < r["mfu"] and r["params"] > 0 and r["skipped_steps"] == 0, r
        assert {"s_per_step", "peak_mem_gb", "compile_s", "gpu", "torch", "batch"} <= set(r)
    assert recs["fast"]["loss"] == recs["bf16"]["loss"]  # same maths, same draws
    assert recs["sample-1step-eager"]["img_per_s"] > 0 and recs["total"]["failures"] == 0
    assert "skipped" in recs["bf16+compile"]
    assert "aten::convolution" in (tmp_path / "prof" / "profile-bf16.txt").read_text()


@pytest.mark.parametrize("arch", ["ddpmpp", "edm2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_f_theta_traces_as_one_graph(arch, dtype):
    """torch.compile must see f_θ (preconditioning, network, keyed dropout) as one graph: a graph break splits
    the compiled step into pieces and once sent a float-typed bitwise kernel to inductor's C++ compiler."""
    preset = "cifar10" if arch == "ddpmpp" else "imagenet64-s"
    cfg = get_preset(preset, "tune")
    net = replace(SMALL_CONFIGS["tiny"], img_channels=3, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                  dropout=0.2) if arch == "ddpmpp" else replace(
        cfg.net, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,), img_resolution=32)
    cfg = replace(cfg, net=net)
    torch._dynamo.reset()
    model = build_model(cfg, compute_dtype=dtype).train()
    n = 4
    x = torch.randn(n, 3, cfg.net.img_resolution, cfg.net.img_resolution)
    labels = torch.zeros(n, dtype=torch.long) if cfg.net.label_dim else None
    explained = torch._dynamo.explain(model)(x, torch.rand(n) + 0.1, labels, dropout_key=torch.arange(n))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _steps_with_target_rows(cfg, sizes: list[int]) -> list[int]:
    """Images-seen values whose target pass has each of `sizes` rows, in that order."""
    total, found = int(cfg.train.total_kimg * 1000), {}
    for nimg in range(0, total, total // 2000):
        found.setdefault(target_pass_rows(cfg, nimg), nimg)
    return [found[n] for n in sizes]


# The full-first-target case (32) runs with the slow tests: it keeps the default suite under 5 minutes.
@pytest.mark.parametrize("first_rows", [16, pytest.param(32, marks=pytest.mark.slow)])
def test_compiled_step_makes_one_static_student_and_one_dynamic_target_graph(monkeypatch, first_rows):
    """Whatever the first step's target size, torch.compile must build exactly one student graph (static batch,
    with grad) and one target graph (dynamic batch, no grad), each once. Without the hints the student graph turned
    dynamic when the first target pass was smaller than the batch, and a full first target pass cost a third graph.
    (Sizes stay ≥ 16: on the CPU, torch.compile guards the convolution backend choice on batch < 16.)"""
    graphs = []

    def recording_backend(gm, example_inputs):
        sizes = [d for x in example_inputs if isinstance(x, torch.Tensor) for d in x.shape]
        dynamic = any(isinstance(v, torch.SymInt) for v in [*example_inputs, *sizes])
        graphs.append(("grad" if torch.is_grad_enabled() else "no grad", "dynamic" if dynamic else "static"))
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=recording_backend))
    torch._dynamo.reset()
    cfg = small_cfg(compile=True, batch=32)
    cfg = replace(cfg, net=replace(SMALL_CONFIGS["tiny"], img_channels=3, attn_resolutions=(16,), dropout=0.2))
    data, dev = random_data(cfg), torch.device("cpu")
    model = build_model(cfg, compute_dtype=torch.float32)
    opt = make_optimizer(cfg, list(model.net.parameters()), dev)
    spec = loss_spec(cfg.objective, data_dim=3 * 32 * 32, sigma_data=0.5)
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=dev, guard="sync")
    model.train()
    for nimg in _steps_with_target_rows(cfg, [first_rows, 24, first_rows]):
        training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=rt_dist.Dist())
    assert graphs == [("grad", "static"), ("no grad", "dynamic")]  # the student pass runs first
    torch._dynamo.reset()


@pytest.mark.slow
def test_step_anatomy_bf16_halves_saved_activations(tmp_path):
    """benchmarks/step_anatomy.py on the fashion-mnist preset: the bf16 path must save about half the bytes of
    fp32 for backward and move fewer bytes; an fp32 tensor left in the bf16 block flow would break this."""
    figures = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.json"
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_anatomy.py"), "--preset", "fashion-mnist",
                              "--precision", precision, "--json", str(path)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        figures[precision] = json.loads(path.read_text())
    f32, b16 = figures["fp32"], figures["bf16"]
    preset_params = count_params(build_net(get_preset("fashion-mnist", "tune").net))  # it timed the preset's network
    assert f32["kernels_per_step"] > 1000 and b16["params"] == f32["params"] == preset_params
    assert 0.4 < b16["saved_mb_per_img"] / f32["saved_mb_per_img"] < 0.6, (b16, f32)
    assert b16["traffic_mb_per_img"] < 0.8 * f32["traffic_mb_per_img"]


# ------------------------------------------------------------------------- Triton builds, checked without a GPU


def _triton_build(tmp_path, *args: str) -> tuple[int, dict]:
    path = tmp_path / "build.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_build.py"), "--json", str(path), *args],
                         capture_output=True, text=True, timeout=900)
    assert path.exists(), out.stdout[-2000:] + out.stderr[-4000:]
    return out.returncode, json.loads(path.read_text())


triton_missing = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                    reason="Triton is not installed (the test extra installs it on x86_64 Linux)")


@triton_missing
def test_triton_build_rejects_the_pattern_that_failed_on_the_h100(tmp_path):
    """Positive control: the keyed-dropout position hash that Triton refused on the first H100 run (an arange times
    a constant beyond int32, folded into index arithmetic) must fail the cross-build with Triton's own message."""
    rc, rec = _triton_build(tmp_path, "--bad-control")
    assert rc == 1 and rec["builds_failed"] >= 1 and rec["builds_ok"] == 0, rec
    assert "out of range for type int32" in rec["failures"][0], rec["failures"]


@triton_missing
@pytest.mark.slow
def test_compiled_training_step_builds_for_h100(tmp_path):
    """Every Triton kernel of the compiled cifar10 step (tiny widths): student forward and backward, the target
    pass at two batch sizes (a dynamic-shape graph) and 1-step sampling, built to sm_90 machine code."""
    rc, rec = _triton_build(tmp_path, "--net", "tiny")
    assert rc == 0 and rec["builds_failed"] == 0, rec["failures"]
    # the target pass (dynamic), the student's forward and backward (static), then 1-step sampling
    assert rec["graphs"][:3] == ["training static", "inference dynamic", "backward static"], rec
    assert len(rec["graphs"]) == 4 and rec["graphs"][3].startswith("inference"), rec
    assert rec["kernels"] >= 100 and rec["builds_ok"] >= rec["kernels"], rec
    assert sorted(rec["target_batches"]) == [16, 24], rec
