#!/usr/bin/env python
"""ECT training-step and sampling throughput, one JSON line per mode.

    python benchmarks/throughput.py                      # cifar10 preset (DDPM++ 55.7M), batch 128, on CUDA
    python benchmarks/throughput.py --data real          # Fashion-MNIST images instead of random ones
    python benchmarks/throughput.py --allow-cpu          # tiny sizes on the CPU: tests the code path only

Training modes (each a full step as `train()` runs it: data, student + target passes, optimiser, EMA, loss
meter; the ECT stage is the preset's last by default, where nearly every row needs the target pass):

    fp32          fp32 network, TF32 off (the reference maths)
    tf32          fp32 network, TF32 matmuls/convolutions
    bf16          bf16 autocast inside the network (eager)
    bf16+compile  bf16 + torch.compile of f_θ; host-synchronising non-finite check (as before this change)
    fast          the default CUDA path of train() in the stages where `--train.precision auto` picks bf16:
                  bf16 + compile + device-side non-finite guard; flags are read one step late, so the host
                  never waits for the device
(On CUDA every mode gathers batches from a GPU-resident copy of the dataset, as training_step now does.)
    sample        1-step sampling f(80·z, 80) at --sample-batch (eager bf16 and compiled), plus the
                  end-to-end `sample_images` rate (per-seed CPU noise included)

Fields: mode, img_per_s, s_per_step, mfu (model FLOPs/s over a bf16 matmul peak measured in this run), peak
memory (GiB allocated), compile_s (warm-up time beyond the steady-state step time), gpu, torch, batch, params.
Modes run in an order that lets compiled modes share the compile cache; a time budget (--budget-s) skips
what would overrun. On a machine without CUDA the script prints a message and exits 0 unless --allow-cpu.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace

import torch

TRAIN_MODES = {
    "fp32": dict(precision="fp32", tf32=False, compile=False, guard="sync", lag=False),
    "tf32": dict(precision="fp32", tf32=True, compile=False, guard="sync", lag=False),
    "bf16": dict(precision="bf16", tf32=True, compile=False, guard="sync", lag=False),
    "bf16+compile": dict(precision="bf16", tf32=True, compile=True, guard="sync", lag=False),
    "fast": dict(precision="bf16", tf32=True, compile=True, guard="device", lag=True),
}
# Run order: the most important first; `fast` compiles, `bf16+compile` then reuses inductor's cache.
DEFAULT_ORDER = ["fast", "bf16", "sample", "tf32", "fp32", "bf16+compile"]
CPU_ORDER = ["fp32", "tf32", "bf16", "fast", "bf16+compile", "sample"]  # compile skipped unless --cpu-compile


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--modes", default="", help="comma-separated subset of: " + ", ".join([*TRAIN_MODES, "sample"]))
    p.add_argument("--warmup", type=int, default=8, help="untimed steps per mode (compile happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--sample-batch", type=int, default=1024)
    p.add_argument("--data", choices=["random", "real"], default="random")
    p.add_argument("--stage", type=int, default=0, help="ECT stage a to time (0 = the preset's last stage)")
    p.add_argument("--budget-s", type=float, default=270.0, help="skip modes that would start after this")
    p.add_argument("--allow-cpu", action="store_true", help="run tiny sizes on the CPU (tests the code path)")
    p.add_argument("--cpu-compile", action="store_true", help="with --allow-cpu: also run the compiled modes")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--profile", default="", help="folder: after timing, profile 3 steps of each training mode and "
                   "write the kernels that take the most device time to profile-MODE.txt there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("throughput.py: no CUDA device; nothing measured (pass --allow-cpu to run tiny sizes on the CPU)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    tiny = device.type == "cpu"
    if tiny:
        args.batch = min(args.batch, 8)
        args.sample_batch = min(args.sample_batch, 8)
        args.warmup, args.steps = min(args.warmup, 2), min(args.steps, 2)
    modes = [m for m in args.modes.split(",") if m] or (CPU_ORDER if tiny else DEFAULT_ORDER)
    unknown = [m for m in modes if m not in TRAIN_MODES and m != "sample"]
    if unknown:
        print(f"throughput.py: unknown mode(s) {unknown}", file=sys.stderr)
        return 2

    from ectune.runtime.device import describe_hardware
    from measure import matmul_peak_tflops

    t_start = time.perf_counter()
    cfg = bench_config(args, tiny)
    data = bench_data(args, cfg)
    common = dict(gpu=describe_hardware(device), torch=torch.__version__, preset=args.preset, batch=args.batch,
                  data=args.data, cuda=torch.version.cuda)
    peak = matmul_peak_tflops(device, n=256 if tiny else 8192, iters=3 if tiny else 20)
    emit(args, dict(mode="matmul-peak", tflops=round(peak, 1), dtype="bfloat16", n=256 if tiny else 8192, **common))

    failures = 0
    for mode in modes:
        if tiny and not args.cpu_compile and mode in TRAIN_MODES and TRAIN_MODES[mode]["compile"] and mode != "fast":
            emit(args, dict(mode=mode, skipped="compile on the CPU (pass --cpu-compile)", **common))
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            emit(args, dict(mode=mode, skipped=f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}", **common))
            continue
        try:
            if mode == "sample":
                for rec in bench_sampling(args, cfg, device, peak, tiny):
                    emit(args, {**rec, **common, "batch": args.sample_batch})
            else:
                spec = dict(TRAIN_MODES[mode], name=mode.replace("+", "-"))
                if tiny and not args.cpu_compile:
                    spec["compile"] = False
                emit(args, {**bench_train(args, cfg, data, device, spec, peak), "mode": mode, **common})
        except Exception as exc:  # one mode's failure must not hide the others
            failures += 1
            emit(args, dict(mode=mode, error=f"{type(exc).__name__}: {exc}", **common))
            traceback.print_exc(file=sys.stderr)
        cleanup(device)
    emit(args, dict(mode="total", seconds=round(time.perf_counter() - t_start, 1), failures=failures, **common))
    return 1 if failures else 0


def emit(args: argparse.Namespace, record: dict) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # compiled modes must not exhaust the per-function recompile limit
    except Exception:
        pass


def bench_config(args: argparse.Namespace, tiny: bool):
    from ectune.presets import get_preset

    cfg = get_preset(args.preset, "tune")
    if tiny:
        from ectune.nets import SMALL_CONFIGS

        net = replace(SMALL_CONFIGS["tiny"], img_channels=cfg.net.img_channels, model_channels=16, channel_mult=(1, 2),
                      num_blocks=1, attn_resolutions=(16,), dropout=cfg.net.dropout)
        cfg = replace(cfg, net=net)
    return replace(cfg, train=replace(cfg.train, batch=args.batch, accum=1),
                   runtime=replace(cfg.runtime, sample_kimg=0.0, eval_kimg=0.0))


def bench_data(args: argparse.Namespace, cfg):
    """Random uint8 images of the preset's shape, or Fashion-MNIST (padded to the network's resolution, repeated to
    3 channels if the network is RGB); with class labels if the network is class-conditional (random ones, or
    Fashion-MNIST's 10)."""
    from ectune.data import ImageDataset
    from ectune.data.idx import load_fashion_mnist
    from ectune.data.dataset import pad_images

    c, res, k = cfg.net.img_channels, cfg.net.img_resolution, cfg.net.label_dim
    if args.data == "random":
        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (4096, c, res, res), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, k, (4096,), generator=g) if k else None
        return ImageDataset(images, labels, k, f"random uint8 {c}x{res}x{res}")
    ds = load_fashion_mnist("", split="train", use_labels=k > 0)
    images = pad_images(ds.images, res, where="Fashion-MNIST")
    if c != images.shape[1]:
        images = images.repeat(1, c, 1, 1).contiguous()
    return ImageDataset(images, ds.labels, k, f"Fashion-MNIST as {c}x{res}x{res}")


def start_nimg(args: argparse.Namespace, cfg) -> int:
    """The first image of the timed ECT stage (the last one by default: r > 0 for almost every row)."""
    from ectune.objectives import stage_nimg

    obj = cfg.objective
    if obj.kind != "ect":
        return 0
    total = cfg.train.total_kimg * 1000
    d = stage_nimg(obj, total)
    a = args.stage or max(1, math.ceil(total / d))
    first = a - (0 if obj.from_scratch else 1)  # a = floor(nimg/d) (+1 when tuning)
    return int(math.ceil(max(first, 0) * d))


def bench_train(args: argparse.Namespace, cfg, data, device: torch.device, spec: dict, peak_tflops: float) -> dict:
    from ectune.ema import EMA
    from ectune.model import build_model
    from ectune.nets import count_params
    from ectune.objectives import loss_spec
    from ectune.runtime import distributed as rt_dist
    from ectune.runtime.device import peak_memory_gb, reset_peak_memory
    from ectune.training.fastpath import FastPath, recompute_norms, target_pass_rows
    from ectune.training.report import IntervalMeter
    from ectune.training.step import make_optimizer, set_learning_rate, training_step
    from measure import Stopwatch, forward_flops

    cfg = replace(cfg, train=replace(cfg.train, precision=spec["precision"]),
                  runtime=replace(cfg.runtime, tf32=spec["tf32"], compile=spec["compile"]))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec["tf32"]
        torch.backends.cudnn.allow_tf32 = spec["tf32"]
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(device)  # training_step sets the precision the mode asks for
    net = model.net
    opt = make_optimizer(cfg, list(net.parameters()), device)
    ema = EMA(net, cfg.ema)
    dist = rt_dist.Dist()
    loss = loss_spec(cfg.objective, data_dim=math.prod(data.images.shape[1:]), sigma_data=cfg.precond.sigma_data)
    reset_peak_memory(device)
    fast = FastPath(model, cfg, dist=dist, device=device, guard=spec["guard"])
    meter = IntervalMeter(device)
    model.train()
    B = cfg.train.batch
    nimg = start_nimg(args, cfg)
    pending: list = []
    state = dict(bad=0, skipped=0)

    def settle(flag) -> None:  # what train() does with the flag
        if bool(flag):
            state["bad"] = 0
        else:
            state["bad"] += 1
            state["skipped"] += 1
            if state["bad"] >= cfg.runtime.max_bad_steps:
                raise RuntimeError(f"{state['bad']} non-finite steps in a row")

    def drain() -> None:  # settle the flags still pending
        for f in pending:
            settle(f)
        pending.clear()

    def one_step() -> None:
        nonlocal nimg
        lr = set_learning_rate(opt, cfg, nimg)
        step = training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=loss, nimg=nimg, dist=dist)
        if spec["lag"]:
            pending.append(step.kept)
            while len(pending) > 1:  # read the previous step's flag: long done, no wait
                settle(pending.pop(0))
        else:
            settle(step.kept)
        net.normalize_weights_()
        nimg += B
        ema.update(net, nimg=nimg, batch=B)
        meter.add(step.loss_sum, B, step.r_over_t)
        del lr

    counters = _dynamo_counters()
    sw = Stopwatch(device)
    sw.start()
    one_step()
    first_s = sw.stop()
    sw.start()
    for _ in range(max(args.warmup - 1, 0)):
        one_step()
    warm_s = first_s + sw.stop()
    graphs_before = _graph_count(counters)
    first_timed = nimg
    sw.start()
    for _ in range(args.steps):
        one_step()
    drain()
    elapsed = sw.stop()
    graphs_during = _graph_count(counters) - graphs_before
    if args.profile:
        profile_steps(one_step, device, os.path.join(args.profile, f"profile-{spec['name']}.txt"))
        drain()
    mean_loss = meter.summary()["loss"]
    peak_gb = peak_memory_gb(device)

    s_per_step = elapsed / args.steps
    rows = sum(target_pass_rows(cfg, first_timed + i * B) for i in range(args.steps))
    x1 = torch.randn(2, cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution, device=device)
    fwd = forward_flops(model, x1, torch.full((2,), 1.0, device=device)) / 2  # per image
    flops = fwd * (3 * B * args.steps + rows)  # student fwd + bwd (≈ 2× fwd) + target fwd on r > 0 rows
    guard = fast.step_guard(opt)
    return dict(
        img_per_s=round(B * args.steps / elapsed, 1), s_per_step=round(s_per_step, 5),
        mfu=round(flops / elapsed / (peak_tflops * 1e12), 4), model_tflops=round(flops / elapsed / 1e12, 1),
        peak_mem_gb=round(peak_gb, 3),
        compile_s=round(max(warm_s - args.warmup * s_per_step, 0.0), 1) if spec["compile"] else 0.0,
        first_step_s=round(first_s, 2), warmup_steps=args.warmup, timed_steps=args.steps,
        target_row_fraction=round(rows / (B * args.steps), 3), fwd_gflop_per_img=round(fwd / 1e9, 2),
        start_kimg=round(first_timed / 1000, 1), loss=round(mean_loss, 5), skipped_steps=state["skipped"],
        guard_sync_steps=None if guard is None else guard.sync_steps, graphs_compiled_during_timing=graphs_during,
        params=count_params(net), recompute_norms=recompute_norms(cfg.runtime.recompute_norms, device,
                                                                   compiled=spec["compile"]),
        **{k: v for k, v in spec.items() if k != "name"},
    )


def profile_steps(one_step, device: torch.device, path: str, steps: int = 3) -> None:
    """torch.profiler over a few steps: the operations and kernels sorted by self device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{steps} steps; sorted by {key}\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


def bench_sampling(args: argparse.Namespace, cfg, device: torch.device, peak_tflops: float, tiny: bool) -> list[dict]:
    from ectune.model import build_model, sample_images
    from ectune.nets import count_params
    from ectune.runtime.device import peak_memory_gb, reset_peak_memory
    from measure import Stopwatch, forward_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    n = args.sample_batch
    torch.manual_seed(0)
    model = build_model(cfg, compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    shape = (n, cfg.net.img_channels, cfg.net.img_resolution, cfg.net.img_resolution)
    t_max = cfg.sample.t_max
    sigma = torch.full((n,), t_max, device=device)
    fwd = forward_flops(model, torch.randn(2, *shape[1:], device=device), sigma[:2]) / 2
    out = []
    variants = [("sample-1step-eager", model)]
    if device.type == "cuda" or args.cpu_compile:
        variants.append(("sample-1step-compiled", torch.compile(model)))
    iters = 2 if tiny else 10
    for name, f in variants:
        reset_peak_memory(device)
        sw = Stopwatch(device)
        with torch.no_grad():
            sw.start()
            y = f(torch.randn(shape, device=device) * t_max, sigma)
            first = sw.stop()
            f(torch.randn(shape, device=device) * t_max, sigma)
            zs = [torch.randn(shape, device=device) for _ in range(2)]
            sw.start()
            for i in range(iters):
                y = f(zs[i % 2] * t_max, sigma)
            elapsed = sw.stop()
        if not torch.isfinite(y).all():
            raise RuntimeError(f"{name}: non-finite samples")
        out.append(dict(mode=name, img_per_s=round(n * iters / elapsed, 1), s_per_batch=round(elapsed / iters, 5),
                        mfu=round(fwd * n * iters / elapsed / (peak_tflops * 1e12), 4),
                        floor_img_per_s_at_peak=round(peak_tflops * 1e12 / fwd, 1),
                        peak_mem_gb=round(peak_memory_gb(device), 3), compile_s=round(first, 1),
                        params=count_params(model.net), compute_dtype=str(model.compute_dtype)))
    # End to end as `ectune sample` does it (per-seed CPU noise, copy back to the host).
    sw = Stopwatch(device)
    sw.start()
    imgs = sample_images(model, cfg, torch.arange(n), steps=1, batch=n, device=device)
    elapsed = sw.stop()
    out.append(dict(mode="sample-1step-sample_images", img_per_s=round(n / elapsed, 1), s_per_batch=round(elapsed, 4),
                    shape=list(imgs.shape), params=count_params(model.net)))
    return out


def _dynamo_counters():
    try:
        from torch._dynamo.utils import counters

        return counters
    except Exception:
        return None


def _graph_count(counters) -> int:
    if counters is None:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
