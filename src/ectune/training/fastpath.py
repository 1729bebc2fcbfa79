"""How this process runs a training step fast, without changing what the step computes.

One `FastPath` per `train()` call owns every speed-only choice: torch.compile and DDP wrapping of f_θ (and the
row padding the compiled target pass wants), GroupNorm + SiLU recomputation, keeping a small dataset on the GPU,
and skipping non-finite steps on the device instead of with a host sync. The step asks it for f_θ's two passes,
a batch's rows and the step guard; nothing else in training knows these exist.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import ImageDataset, load_batch
from ..losses import Passes, target_rows
from ..objectives import draw_t_r
from ..precond import Precond, replace_precond
from ..runtime.distributed import Dist
from .guard import DeviceStepGuard, make_state_capturable
from .step import step_generator

# Keep a dataset on the GPU only if it takes at most this share of the GPU's memory.
RESIDENT_MAX_FRACTION = 0.2
# Target-pass rows are padded to a multiple of this when compiling, so the compiled graph sees few batch sizes.
COMPILED_ROW_MULTIPLE = 8


class FastPath:
    """f_θ wrapped for training on `device`, the data path and the non-finite-step guard of one process.

    With cfg.runtime.compile one process compiles the whole f_θ (preconditioning + network: the scalings, the bf16
    casts and the boundary select fuse with the network's first and last layers); under DDP only the network is
    compiled. The compiled module shares `model`'s parameters, so the optimiser, EMA and checkpoints (which hold
    `model.net`) are unaffected. Expect one graph for the student pass and one for the target pass, whose batch size
    varies with the number of r > 0 rows (`passes` declares which is which: `with_batch_hint`).

    `guard` picks how a step with a non-finite loss or gradient is skipped: "sync" reads the check on the host (one
    sync per step, the CPU and multi-process default); "device" skips it on the device (`DeviceStepGuard`, the
    single-process CUDA default); "auto" chooses.
    """

    def __init__(self, model: Precond, cfg: RunConfig, *, dist: Dist, device: torch.device, guard: str = "auto") -> None:
        self.device, self.world_size = device, dist.world_size
        self.compiled = cfg.runtime.compile
        self.guard_mode = guard_mode(guard, device, dist.world_size)
        model.net.set_recompute_norms(recompute_norms(cfg.runtime.recompute_norms, device, compiled=self.compiled))
        if self.compiled and dist.world_size == 1:
            self.target: nn.Module = torch.compile(model)  # an OptimizedModule: .net, .compute_dtype reach `model`
        elif self.compiled:
            self.target = replace_precond(model, net=torch.compile(model.net))
        else:
            self.target = model
        self.student: nn.Module = self.target
        if dist.world_size > 1:  # the target pass bypasses DDP: it has no backward for DDP to reduce
            self.student = nn.parallel.DistributedDataParallel(
                self.target, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        self.model = model
        self._resident: tuple[Tensor, Tensor, Tensor | None] | None = None  # (source images, on device, labels)
        self._guard: DeviceStepGuard | None = None

    @property
    def row_multiple(self) -> int:
        return COMPILED_ROW_MULTIPLE if self.compiled else 1

    def passes(self) -> Passes:
        """f_θ's student and target passes for `consistency_loss`."""
        student, target = self.student, self.target
        if self.compiled and self.world_size == 1:  # under DDP only the network is compiled; f_θ's inputs are made inside
            student, target = with_batch_hint(student, dynamic=False), with_batch_hint(target, dynamic=True)
        return Passes(student, target, self.row_multiple)

    def no_sync(self, last_round: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP all-reduces gradients only in the last accumulation round."""
        if last_round or self.world_size == 1:
            return contextlib.nullcontext()
        return self.student.no_sync()

    def step_guard(self, opt: torch.optim.Optimizer) -> DeviceStepGuard | None:
        """The device-side guard of `opt` (made on first use), or None when steps are guarded with a host sync."""
        if self.guard_mode != "device":
            return None
        params = [p for p in self.model.net.parameters() if p.requires_grad]
        if self._guard is None or len(self._guard.params) != len(params) or any(
                a is not b for a, b in zip(self._guard.params, params)):
            make_state_capturable(opt, self.device)  # step counters on the GPU, so the skip needs no host sync
            self._guard = DeviceStepGuard(params)
        return self._guard

    def load_rows(self, data: ImageDataset, indices: Tensor, *, positions: Tensor, seed: int) -> tuple[Tensor, Tensor | None]:
        """Images (or latents) and labels of `indices`, on the device; `positions` and `seed` key the fresh posterior
        draw of latent datasets that store one (`load_batch`). On CUDA a dataset that fits easily is copied to the
        GPU once and gathered there (no per-step host gather or pageable copy); otherwise `load_batch` on the host."""
        resident = None if data.images_std is not None else self._resident_data(data)
        if resident is None:
            images, labels = load_batch(data, indices, positions=positions, seed=seed)
            return images, None if labels is None else labels.to(self.device)
        images_dev, labels_dev = resident
        if indices.ndim != 1 or indices.dtype != torch.int64:
            raise ValueError(f"indices must be an int64 vector, got {indices.dtype} {tuple(indices.shape)}")
        idx = indices.to(self.device, non_blocking=True)
        return images_dev.index_select(0, idx), None if labels_dev is None else labels_dev.index_select(0, idx)

    def _resident_data(self, data: ImageDataset) -> tuple[Tensor, Tensor | None] | None:
        if self.device.type != "cuda":
            return None
        if self._resident is not None and self._resident[0] is data.images:
            return self._resident[1], self._resident[2]
        nbytes = data.images.numel() * data.images.element_size()
        if nbytes > RESIDENT_MAX_FRACTION * torch.cuda.get_device_properties(self.device).total_memory:
            return None
        labels = None if data.labels is None else data.labels.to(self.device)
        self._resident = (data.images, data.images.to(self.device), labels)
        return self._resident[1], labels


def guard_mode(guard: str, device: torch.device, world_size: int) -> str:
    """"device" (skip non-finite steps on the GPU, no host sync) for one CUDA process, else "sync"."""
    if guard == "auto":
        return "device" if device.type == "cuda" and world_size == 1 else "sync"
    if guard not in ("sync", "device"):
        raise ValueError(f"guard must be 'auto', 'sync' or 'device', got {guard!r}")
    if guard == "device" and world_size > 1:
        raise ValueError("guard='device' is single-process only (DDP manages the .grad tensors); use 'sync'")
    return guard


def recompute_norms(choice: str, device: torch.device, *, compiled: bool) -> bool:
    """Whether eager training recomputes GroupNorm + SiLU in backward (RuntimeConfig.recompute_norms)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--runtime.recompute-norms must be auto, on or off, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.type == "cuda" and not compiled)


def with_batch_hint(f: Callable[..., Tensor], *, dynamic: bool) -> Callable[..., Tensor]:
    """`f` (a compiled f_θ) with its inputs' batch dimension declared to torch.compile before every call: static for
    the student pass (always the whole batch), dynamic for the target pass (the r > 0 rows, padded to 8).

    Both passes enter one compiled function, whose input sizes torch.compile otherwise tracks together, so the
    graphs it builds would depend on the first step: a first target pass smaller than the batch (a run starting in
    an early ECT stage) makes the student graph dynamic too, and one as large as the batch (the last stage) costs an
    extra static target graph that is replaced at the next size. Declared, every run compiles the same two: a
    static student graph (forward + backward) and a dynamic target graph, each once. A hint is only read when a
    graph is compiled; it costs nothing afterwards.
    """
    mark = torch._dynamo.maybe_mark_dynamic if dynamic else torch._dynamo.mark_static

    def hinted(x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        for a in (x, sigma, class_labels, *kwargs.values()):
            if isinstance(a, Tensor) and a.ndim > 0:
                mark(a, 0)
        return f(x, sigma, class_labels, **kwargs)

    return hinted


def target_pass_rows(cfg: RunConfig, nimg: int) -> int:
    """Rows the target pass of the global step at `nimg` runs (the step's own draw and padding)."""
    _, r = draw_t_r(cfg.objective, n=cfg.train.batch, nimg=nimg, total_nimg=cfg.train.total_kimg * 1000,
                    generator=step_generator(cfg.train.seed, nimg))
    rows = target_rows(r, COMPILED_ROW_MULTIPLE if cfg.runtime.compile else 1)
    return 0 if rows is None else rows.numel()
