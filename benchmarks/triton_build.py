"""Build every Triton kernel that torch.compile makes for ectune's training step, for an NVIDIA GPU, on a machine
without one.

torch.compile (inductor) lowers f_θ to Triton kernels, and Triton compiles each one to PTX and then to machine code
with the ptxas it ships: neither step needs a GPU. This script lets inductor write Triton code for the CPU tensors
of a real compiled training step (`cpu_backend="triton"`), gives Triton's compiler an sm_90 (H100) target, and
builds every kernel in every autotuning configuration. The step itself runs eagerly from the same graphs, so that
backward and the target pass at a second batch size (the dynamic-shape graph) are traced and built too, followed by
1-step sampling in eval mode.

Why: the first H100 session lost all its compiled modes to one kernel that Triton rejected (an integer constant out
of int32 range that inductor had folded from keyed dropout's hash into index arithmetic). That failure shows here in
minutes, with no device time; `--bad-control` reproduces it.

What this does not show: that the kernels run, run correctly or run fast. The traced flow is CPU autocast's, not
CUDA's (they differ in the ops kept in fp32; ectune's GroupNorm opts out of autocast, so the norm flow matches).

Needs Triton beside torch: `pip install triton==3.6.0` (the version the GPU image's torch 2.11 uses). Prints one
JSON line: graphs traced, kernels built and failed, with the first failures' messages (exit status 1 if any
failed), and per graph inductor's estimate of the bytes its Triton kernels read and write (`graph_triton_gb`;
convolutions, matmuls and attention run outside Triton and are not included: this is the memory-bound part).

    python benchmarks/triton_build.py                      # cifar10 preset (about 5 minutes on 2 cores)
    python benchmarks/triton_build.py --top 10             # also the 10 kernels of each graph that move the most
    python benchmarks/triton_build.py --preset imagenet64-s
    python benchmarks/triton_build.py --net tiny           # same architecture, tiny widths (CI-sized)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


@dataclass
class BuildLog:
    """What the cross-compiling backend saw: one entry per graph and per (kernel, autotuning config)."""

    graphs: list[str] = field(default_factory=list)  # "training static", "backward static", "inference dynamic", …
    graph_gb: list[float] = field(default_factory=list)  # inductor's estimate of the bytes its kernels move, per graph
    graph_top: list[list[tuple[str, float]]] = field(default_factory=list)  # the kernels moving the most, per graph
    kernel_gb: dict[str, float] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def cross_compiling_backend(arch: int, log: BuildLog, top: int = 0):
    """A torch.compile backend: inductor lowers each graph to Triton and every kernel is built for CUDA sm_`arch`;
    the graph then runs eagerly on the CPU (the built kernels cannot run here)."""
    import triton
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)

    class TargetOnlyDriver:  # inductor asks the active driver for the target when it hashes kernels
        def get_current_target(self):
            return target

        def is_active(self) -> bool:
            return True

    triton.runtime.driver.set_active(TargetOnlyDriver())
    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1  # kernels are built in this process, by the replacement below
    inductor_config.fx_graph_cache = False  # a cached graph would skip code generation, and so the builds
    inductor_config.profile_bandwidth = True  # only so that inductor estimates each kernel's bytes; nothing runs
    warnings.filterwarnings("ignore", message="Could not find an active CPU backend")  # known: nothing runs here

    def build_only(self: CachingAutotuner, *args, **kwargs) -> None:
        name = self.inductor_meta.get("kernel_name", "?")
        log.kernel_gb[name] = self.inductor_meta.get("kernel_num_gb") or 0.0
        for cfg in self.configs:
            meta = self._create_compile_meta(cfg)
            source = ASTSource(self.fn, meta["signature"], meta["constants"], meta["configs"][0])
            try:
                triton.compile(source, target=target, options=self._create_compile_options(cfg, meta))
                log.built.append(name)
            except Exception as exc:
                log.failed.append((name, f"{type(exc).__name__}: {exc}"[:1500] + "\n" + self.fn.src[:3000]))

    CachingAutotuner.precompile = build_only

    def inner(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        with unset_fake_temporarily():
            eager = copy.deepcopy(gm)  # inductor rewrites gm in place; the copy is what runs
        shapes = [x.shape for x in example_inputs if isinstance(x, torch.Tensor)]
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "training"
        dynamic = any(isinstance(d, torch.SymInt) for s in shapes for d in s)
        log.graphs.append(f"{kind} {'dynamic' if dynamic else 'static'}")
        try:
            wrapper = getattr(compile_fx_inner(gm, example_inputs, **kwargs), "source_code", "")
        except Exception as exc:
            wrapper = ""
            log.failed.append(("<graph>", "".join(traceback.format_exception(exc))[-3000:]))
        # Each launch in the graph's wrapper code moves its kernel's estimated bytes (convolutions and matmuls,
        # which run outside Triton, are not counted: this is the memory-bound part).
        launches = collections.Counter(re.findall(r"(\w+)\.run\(", wrapper))
        moved = {k: n * log.kernel_gb.get(k, 0.0) for k, n in launches.items()}
        log.graph_gb.append(sum(moved.values()))
        log.graph_top.append([(k, round(gb, 4)) for k, gb in sorted(moved.items(), key=lambda kv: -kv[1])[:top]])

        def run(args: list):
            out = eager(*args)
            args.clear()
            return out

        run._boxed_call = True
        return run

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner)


@contextlib.contextmanager
def compile_with(backend):
    """Make every torch.compile call inside use `backend` (the training code calls torch.compile itself)."""
    original = torch.compile

    def patched(model=None, **kwargs):
        return original(model, **{**kwargs, "backend": backend})

    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = original


def build_config(preset: str, net_size: str, batch: int):
    from ectune.presets import get_preset

    cfg = get_preset(preset, "tune")
    if net_size == "tiny":  # the preset's architecture and options at CI size
        net = replace(cfg.net, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                      img_resolution=32)
        cfg = replace(cfg, net=net)
    return replace(cfg, train=replace(cfg.train, batch=batch, accum=1, precision="bf16"),
                   runtime=replace(cfg.runtime, compile=True))


def step_starts(cfg, sizes: int) -> list[tuple[int, int]]:
    """Images-seen values whose target pass has `sizes` different batch sizes of at least 16, with those sizes.
    (On the CPU, torch.compile guards its convolution backend choice on batch < 16, which would add a CPU-only
    graph.)"""
    from ectune.training.fastpath import target_pass_rows

    total, found = int(cfg.train.total_kimg * 1000), {}
    for nimg in range(0, total, max(total // 400, 1)):
        rows = target_pass_rows(cfg, nimg)
        if rows >= 16 and rows not in found.values():
            found[nimg] = rows
        if len(found) == sizes:
            break
    return list(found.items())


def trace_training_and_sampling(cfg) -> dict:
    from ectune.data import ImageDataset
    from ectune.model import build_model
    from ectune.objectives import loss_spec
    from ectune.runtime import distributed as rt_dist
    from ectune.training.fastpath import FastPath
    from ectune.training.step import make_optimizer, training_step

    device, dist = torch.device("cpu"), rt_dist.Dist()
    torch.manual_seed(0)
    model = build_model(cfg, compute_dtype=torch.bfloat16)
    opt = make_optimizer(cfg, list(model.net.parameters()), device)
    c, res, n = cfg.net.img_channels, cfg.net.img_resolution, 4 * cfg.train.batch
    labels = torch.randint(0, cfg.net.label_dim, (n,)) if cfg.net.label_dim else None
    data = ImageDataset(torch.randint(0, 256, (n, c, res, res), dtype=torch.uint8), labels, cfg.net.label_dim, "random")
    spec = loss_spec(cfg.objective, data_dim=c * res * res, sigma_data=cfg.precond.sigma_data)
    fast = FastPath(model, cfg, dist=dist, device=device, guard="sync")
    model.train()
    steps = step_starts(cfg, sizes=2)
    for nimg, _ in steps:
        training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=spec, nimg=nimg, dist=dist)
    model.eval()
    with torch.no_grad():
        x = torch.randn(cfg.train.batch, c, res, res) * 80.0
        torch.compile(model)(x, torch.full((cfg.train.batch,), 80.0), None if labels is None else labels[: len(x)])
    return dict(target_batches=[b for _, b in steps])


def trace_bad_control() -> dict:
    """The pattern that failed on the H100: an arange times a constant beyond int32, masked to 32 bits, feeding
    element-wise maths. Inductor folds it into index arithmetic and Triton must reject it."""
    def f(x: torch.Tensor) -> torch.Tensor:
        pos = (torch.arange(x.shape[-1], dtype=torch.int64) * 0x9E3779B9) & 0xFFFFFFFF
        return x * (pos >= 2**31)

    torch.compile(f)(torch.randn(4, 256))
    return {}  # nothing to report beyond the build log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--net", choices=["preset", "tiny"], default="preset", help="the preset's network or tiny widths")
    p.add_argument("--batch", type=int, default=32, help="training batch traced (the target pass sees 2 sizes)")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to build for (90 = H100)")
    p.add_argument("--bad-control", action="store_true", help="build the known-bad pattern instead: must fail")
    p.add_argument("--top", type=int, default=0, help="also list the K kernels of each graph that move the most bytes")
    p.add_argument("--json", default="", help="also write the result to this file")
    args = p.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("triton_build.py: Triton is not installed; nothing built (pip install triton==3.6.0)")
        return 0

    start, log = time.perf_counter(), BuildLog()
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="ectune-triton-build-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a fresh inductor cache: every kernel is generated and built
        with compile_with(cross_compiling_backend(args.arch, log, args.top)):
            if args.bad_control:
                extra = trace_bad_control()
            else:
                extra = trace_training_and_sampling(build_config(args.preset, args.net, args.batch))
    record = dict(
        preset="bad-control" if args.bad_control else args.preset, net=args.net, batch=args.batch,
        target=f"cuda sm_{args.arch}", torch=torch.__version__, triton=triton.__version__,
        graphs=log.graphs, graph_triton_gb=[round(gb, 3) for gb in log.graph_gb],
        **(dict(graph_top_kernels_gb=log.graph_top) if args.top else {}), kernels=len(set(log.built) | {n for n, _ in log.failed}),
        builds_ok=len(log.built), builds_failed=len(log.failed), seconds=round(time.perf_counter() - start, 1), **extra,
        failures=[f"{name}: {message}" for name, message in log.failed[:3]],
    )
    line = json.dumps(record)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 1 if log.failed else 0


if __name__ == "__main__":
    sys.exit(main())
