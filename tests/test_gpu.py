"""The CUDA fast path on a GPU: bf16 vs fp32, compiled vs eager, keyed dropout under torch.compile, the device-side
non-finite guard and throughput.py. Every test here needs a CUDA device and skips cleanly without one
(benchmarks/gpu_check.sh runs them on a GPU machine); the CPU side of the same machinery is tests/test_fastpath.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ectune.losses import Passes, consistency_loss
from ectune.model import build_model
from ectune.objectives import LossSpec, loss_spec
from ectune.runtime import distributed as rt_dist
from ectune.training.fastpath import FastPath
from ectune.training.guard import StepFlag
from ectune.training.step import make_optimizer, training_step

from conftest import last_stage_nimg, opt_state_snapshot, random_data, small_cfg

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def batch(cfg, device, n: int = 16, seed: int = 0, r_frac: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    shape = (n, cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    eps = torch.randn(shape, generator=g).to(device)
    t = torch.exp(torch.randn(n, generator=g) * 1.5 - 0.5)
    r = torch.where(torch.rand(n, generator=g) < r_frac, t * 0.7, torch.zeros(n))
    keys = torch.randint(0, 2**31 - 1, (n,), generator=g)
    return x0, t, r, eps, keys


def loss_and_grads(f, params, x0, t, r, eps, keys, spec=LossSpec(weighting="inv_dt", p=0.5, c=0.0)):
    for p in params:
        p.grad = None
    loss = consistency_loss(f, x0, t, r, eps, dropout_key=keys, spec=spec)
    loss.sum().backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@gpu
@needs_cuda
def test_bf16_loss_and_grads_match_fp32():
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = small_cfg()
    torch.manual_seed(0)
    m32 = build_model(cfg).to(dev).train()
    m16 = build_model(cfg, compute_dtype=torch.bfloat16).to(dev).train()
    m16.load_state_dict(m32.state_dict())
    args = batch(cfg, dev)
    l32, g32 = loss_and_grads(m32, list(m32.parameters()), *args)
    l16, g16 = loss_and_grads(m16, list(m16.parameters()), *args)
    assert l16.dtype == torch.float32 and torch.isfinite(l16).all()
    assert rel(l16, l32) < 3e-2
    assert rel(torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32])) < 5e-2


@gpu
@needs_cuda
def test_no_fp32_activations_inside_the_bf16_network():
    """CUDA autocast runs group_norm in fp32; the network's GroupNorm opts out, so its outputs (and the SiLU,
    dropout and conv inputs after it) stay bf16 instead of doubling the bytes of every block."""
    from ectune.nets.ddpmpp import GroupNorm

    dev = torch.device("cuda")
    cfg = small_cfg(precision="bf16")
    model = build_model(cfg, compute_dtype=torch.bfloat16).to(dev).train()
    seen = []
    for m in model.net.modules():
        if isinstance(m, GroupNorm):
            m.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    x0, t, r, eps, keys = batch(cfg, dev)
    consistency_loss(model, x0, t, r, eps, dropout_key=keys).sum().backward()
    assert seen and set(seen) == {torch.bfloat16}


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_equals_eager_step(precision):
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    cfg = small_cfg(precision=precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    eager = build_model(cfg, compute_dtype=dtype).to(dev).train()
    comp_model = build_model(cfg, compute_dtype=dtype).to(dev).train()
    comp_model.load_state_dict(eager.state_dict())
    compiled = FastPath(comp_model, replace(cfg, runtime=replace(cfg.runtime, compile=True)), dist=rt_dist.Dist(),
                        device=dev).passes()
    for seed in range(2):  # two target sizes: the dynamic-shape target graph is exercised too
        args = batch(cfg, dev, seed=seed, r_frac=0.5 + 0.3 * seed)
        le, ge = loss_and_grads(eager, list(eager.parameters()), *args)
        lc, gc = loss_and_grads(compiled, list(comp_model.parameters()), *args)
        tol = 1e-3 if precision == "fp32" else 3e-2
        assert rel(lc, le) < tol
        assert rel(torch.cat([g.flatten() for g in gc]), torch.cat([g.flatten() for g in ge])) < 5 * tol


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_dropout_mask_under_compile(precision):
    """With r = t the student and target see the same input; with the same keyed mask the ECT loss is ~0,
    with different masks it is not."""
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    cfg = small_cfg(dropout=0.3, precision=precision)
    torch.manual_seed(0)
    model = build_model(cfg, compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32).to(dev).train()
    f = FastPath(model, replace(cfg, runtime=replace(cfg.runtime, compile=True)), dist=rt_dist.Dist(), device=dev).target
    x0, t, _, eps, keys = batch(cfg, dev)
    kw = LossSpec(weighting="one", p=0.0, c=0.0)
    same = consistency_loss(f, x0, t, t.clone(), eps, dropout_key=keys, spec=kw)
    other_keys = keys + 12345

    def other_mask_target(x, s, labels=None, *, dropout_key=None):
        return f(x, s, labels, dropout_key=other_keys.to(dropout_key.device)[: x.shape[0]])

    differ = consistency_loss(Passes(f, other_mask_target), x0, t, t.clone(), eps, dropout_key=keys, spec=kw)
    ratio = float(same.mean() / differ.mean())
    assert ratio < (1e-4 if precision == "fp32" else 5e-2), ratio


class CountingTarget(nn.Module):
    """Wraps the target f (compiled or not) and records the rows of every call."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f
        self.rows: list[int] = []

    @property
    def net(self):
        return self.f.net

    def forward(self, x, sigma, labels=None, *, dropout_key=None):
        assert not torch.is_grad_enabled()
        self.rows.append(int(x.shape[0]))
        out = self.f(x, sigma, labels, dropout_key=dropout_key)
        assert out.dtype == torch.float32
        return out


@gpu
@needs_cuda
def test_r_zero_rows_skip_target_pass_and_no_bf16_reaches_the_loss():
    dev = torch.device("cuda")
    torch._dynamo.reset()
    cfg = small_cfg(precision="bf16", compile=True)
    torch.manual_seed(0)
    model = build_model(cfg, compute_dtype=torch.bfloat16).to(dev).train()
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=dev)
    train_f, counter = fast.student, CountingTarget(fast.target)
    x0, t, r, eps, keys = batch(cfg, dev, r_frac=0.4)
    need = int((r > 0).sum())
    assert 0 < need < len(r)

    def student(x, sigma, labels=None, *, dropout_key=None):
        out = train_f(x, sigma, labels, dropout_key=dropout_key)
        assert out.dtype == torch.float32, out.dtype
        return out

    loss = consistency_loss(Passes(student, counter, 8), x0, t, r, eps, dropout_key=keys)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert counter.rows == [min(-(-need // 8) * 8, len(r))]
    counter.rows.clear()
    consistency_loss(Passes(student, counter, 8), x0, t, torch.zeros_like(r), eps, dropout_key=keys)
    assert counter.rows == []  # pure diffusion: the target pass never runs


@gpu
@needs_cuda
def test_device_guard_on_cuda_skips_bad_steps_without_host_sync():
    dev = torch.device("cuda")
    torch._dynamo.reset()
    cfg = small_cfg(precision="bf16", compile=True)
    data = random_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, compute_dtype=torch.bfloat16).to(dev)
    opt = make_optimizer(cfg, list(model.net.parameters()), dev)
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=dev)
    assert fast.guard_mode == "device"
    spec = loss_spec(cfg.objective, data_dim=3 * 32 * 32, sigma_data=0.5)
    model.train()
    nimg = last_stage_nimg(cfg)

    def step(nimg):
        result = training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=rt_dist.Dist())
        return result.loss_sum, result.kept

    for _ in range(3):  # warm-up: compile, first optimiser step (creates the state), dynamic target graph
        _, flag = step(nimg)
        assert isinstance(flag, StepFlag) and bool(flag)
        nimg += cfg.train.batch
    assert opt.param_groups[0]["capturable"] and all(s["step"].is_cuda for s in opt.state.values())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum, flag = step(nimg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(flag) and float(loss_sum) > 0
    nimg += cfg.train.batch
    before = opt_state_snapshot(opt, list(model.net.parameters()))
    p0 = next(model.net.parameters())
    hook = p0.register_hook(lambda g: g * float("nan"))
    loss_sum, flag = step(nimg)
    hook.remove()
    assert not bool(flag) and float(loss_sum) == 0.0
    after = opt_state_snapshot(opt, list(model.net.parameters()))
    assert all(torch.equal(u, v) for u, v in zip(before, after))


@gpu
@needs_cuda
def test_dataset_resident_on_gpu_gives_the_same_batch():
    from ectune.data import load_batch

    cfg = small_cfg()
    data = random_data(cfg)
    idx = torch.tensor([5, 3, 3, 60, 0])
    cfg = replace(cfg, runtime=replace(cfg.runtime, device="cuda"))
    fast = FastPath(build_model(cfg).cuda(), cfg, dist=rt_dist.Dist(), device=torch.device("cuda"))
    images, labels = fast.load_rows(data, idx)
    assert images.is_cuda and labels is None
    assert torch.equal(images.cpu(), load_batch(data, idx)[0])


@gpu
@needs_cuda
def test_throughput_script_smoke_on_gpu(tmp_path):
    log = tmp_path / "t.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "fashion-mnist",
                          "--batch", "32", "--modes", "bf16,sample", "--warmup", "2", "--steps", "2",
                          "--sample-batch", "64", "--out", str(log)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = {r["mode"]: r for r in map(json.loads, log.read_text().splitlines())}
    assert recs["bf16"]["img_per_s"] > 0 and recs["sample-1step-eager"]["img_per_s"] > 0
