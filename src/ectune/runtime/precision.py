"""Measuring what reduced precision does to ECT's training signal.

ECT learns from Δ = f(x_t, t) − f(x_r, r). As r/t → 1, Δ shrinks while each pass's rounding error does not, and
the errors of the two passes do not cancel. Two numbers say how much of the signal survives a precision mode:

* `delta_noise_ratio`: per row, ‖Δ_mode − Δ_fp32‖ / ‖Δ_fp32‖ (same inputs, weights and dropout keys);
* the `cosine` between the parameter gradients of the training loss (`loss_gradient`) in the mode and in fp32.

`emulate_tf32` reproduces TF32 on any device: while active, every fp32 convolution, matrix product and attention
call (forward and backward) sees its inputs rounded to TF32's 10 explicit mantissa bits, the rest stays fp32.
It works below autograd (a TorchDispatchMode on the aten operations), so the backward convolutions and products
that TF32 also affects are rounded too, and autograd treats the rounding as the identity, as the hardware does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ..losses import consistency_loss
from ..objectives import LossSpec
from ..precond import Precond

_TF32_DROPPED_BITS = 13  # fp32 keeps 23 explicit mantissa bits, TF32 10

_aten = torch.ops.aten
# The operations whose fp32 inputs TF32 tensor cores round: convolutions and matrix products, forward and backward
# (linear and matmul reach the dispatcher as mm/addmm/bmm), and attention, whose kernels are fused (only their
# inputs can be rounded here; the probabilities·V product inside stays fp32).
_TF32_OPS = {
    _aten.convolution.default, _aten.convolution_backward.default, _aten.mm.default, _aten.addmm.default,
    _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_efficient_attention_backward.default,
}


def round_to_tf32(x: Tensor, *, truncate: bool = False) -> Tensor:
    """fp32 `x` with its mantissa rounded to 10 bits (nearest, ties to even; or truncated toward zero).

    Works on the bit pattern: add half of the dropped range (plus the kept LSB for ties-to-even) and clear the 13
    low bits. Overflow to infinity near fp32's maximum is what real rounding does too.
    """
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    mask = (1 << _TF32_DROPPED_BITS) - 1
    if not truncate:
        lsb = (bits >> _TF32_DROPPED_BITS) & 1
        bits = bits + (mask >> 1) + lsb
    return (bits & ~mask).view(torch.float32).reshape(x.shape)


class _TF32Mode(TorchDispatchMode):
    def __init__(self, truncate: bool) -> None:
        super().__init__()
        self.truncate = truncate

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _TF32_OPS:
            def cast(a: Any) -> Any:
                return round_to_tf32(a, truncate=self.truncate) if isinstance(a, Tensor) and a.is_floating_point() else a

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulate_tf32(*, truncate: bool = False) -> Iterator[None]:
    """Round the fp32 inputs of convolutions, matrix products and attention to TF32 while active (any device)."""
    with _TF32Mode(truncate):
        yield


def set_cuda_tf32(enabled: bool) -> None:
    """CUDA's TF32 switches for fp32 matrix products (cuBLAS) and convolutions (cuDNN), both set to `enabled`.
    Process-wide: they apply to the backward pass as well, which runs after f_θ returns."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """`set_cuda_tf32(enabled)` while active, the previous switches restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_cuda_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def tf32_mode(enabled: bool, device: torch.device | str, *, truncate: bool = False) -> Iterator[None]:
    """TF32 for fp32 work while active: CUDA's own switches on a GPU, `emulate_tf32` elsewhere or with `truncate`
    (a bound for hardware that truncates instead of rounding). enabled=False: TF32 off, also on CUDA."""
    native = torch.device(device).type == "cuda" and not truncate
    with cuda_tf32(enabled and native), emulate_tf32(truncate=truncate) if enabled and not native else contextlib.nullcontext():
        yield


@torch.no_grad()
def delta(f: Precond, x0: Tensor, t: Tensor, r: Tensor, eps: Tensor, *, dropout_key: Tensor,
          class_labels: Tensor | None = None) -> Tensor:
    """Δ = f(x_0 + t·ε, t) − f(x_0 + r·ε, r) [N, C, H, W], both passes with the same dropout keys (ECT's signal)."""
    bcast = (-1,) + (1,) * (x0.ndim - 1)
    student = f(x0 + t.reshape(bcast) * eps, t, class_labels, dropout_key=dropout_key)
    target = f(x0 + r.reshape(bcast) * eps, r, class_labels, dropout_key=dropout_key)
    return student - target


def delta_noise_ratio(delta_mode: Tensor, delta_ref: Tensor) -> Tensor:
    """Per row ‖Δ_mode − Δ_ref‖ / ‖Δ_ref‖ [N]: the share of the signal that is rounding noise."""
    return (delta_mode - delta_ref).flatten(1).norm(dim=1) / delta_ref.flatten(1).norm(dim=1)


def loss_gradient(f: Precond, x0: Tensor, t: Tensor, r: Tensor, eps: Tensor, *, dropout_key: Tensor,
                  spec: LossSpec, class_labels: Tensor | None = None, loss_scale: float = 1.0) -> Tensor:
    """The flat gradient of the summed training loss w.r.t. the network's parameters (fp32).

    `loss_scale` multiplies the loss before backward and divides the gradient after it (static loss scaling, as
    fp16 training does to keep small gradients from flushing to zero); 1 = none.
    """
    params = [p for p in f.net.parameters() if p.requires_grad]
    loss = consistency_loss(f, x0, t, r, eps, dropout_key=dropout_key, class_labels=class_labels, spec=spec)
    grads = torch.autograd.grad(loss.sum() * loss_scale, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g.float()).flatten() for p, g in zip(params, grads)])
    return flat / loss_scale


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors, in fp64."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
