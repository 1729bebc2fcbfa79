"""Keyed dropout: a dropout mask that is a pure function of (per-sample key, layer salt, element index).

ECT's target pass must see the same dropout mask as the student pass (REFERENCE §3.4), while rows whose
r = 0 skip the target pass entirely. Replaying the global RNG cannot give both (a sub-batch consumes the
random stream differently), so each sample carries an integer key and every dropout layer hashes
(key, salt, position) into its mask. Row i's mask is then identical in any sub-batch, any batch size and
on any number of GPUs, and the computation is plain tensor maths that torch.compile fuses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_MASK32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32): the reference form."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32  # int64 products wrap; only the low 32 bits are kept, which are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash32_i32(x: Tensor) -> Tensor:
    """`hash32` on int32 tensors (two's-complement wrap-around), bit for bit; ~7× cheaper than int64 on the CPU.
    Right shifts of int32 are arithmetic, so they are masked to act as logical shifts."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2
    return x ^ ((x >> 16) & 0xFFFF)


def _as_i32(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


_M1, _M2, _GOLDEN = _as_i32(0x7FEB352D), _as_i32(0x846CA68B), 0x9E3779B9


def keyed_uniform(key: Tensor, salt: int, shape: torch.Size, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers (24-bit) of `shape` = (N, ...) where row n depends only on (key[n], salt):
    u = lowbias32(seed(key, salt) + lowbias32(position)) >> 8 / 2**24."""
    per_row = int(torch.Size(shape[1:]).numel())
    seed = hash32((key.to(device=device, dtype=torch.int64) & _MASK32) ^ ((salt * _GOLDEN) & _MASK32))
    seed = torch.where(seed >= (1 << 31), seed - (1 << 32), seed).to(torch.int32)
    # Positions are hashed before any multiplication by a large constant: inductor folds affine maths on an
    # arange into Triton index expressions, where constants beyond int32 are rejected at compile time.
    pos = _hash32_i32(torch.arange(per_row, device=device, dtype=torch.int32))
    h = _hash32_i32(seed[:, None] + pos[None, :])
    return (((h >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)


def keyed_uniform_reference(key: Tensor, salt: int, shape: torch.Size) -> Tensor:
    """The same numbers as `keyed_uniform`, computed in int64 (for tests of the int32 fast path)."""
    per_row = int(torch.Size(shape[1:]).numel())
    seed = hash32((key.to(torch.int64) & _MASK32) ^ ((salt * _GOLDEN) & _MASK32))
    pos = hash32(torch.arange(per_row, dtype=torch.int64))
    h = hash32((seed[:, None] + pos[None, :]) & _MASK32)
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)


class KeyedDropout(nn.Module):
    """Dropout whose mask follows a per-sample key when one is given (else ordinary dropout).

    `salt` distinguishes layers; `assign_dropout_salts` numbers them after the network is built.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.salt = 0

    def forward(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if key is None:
            return nn.functional.dropout(x, self.p, training=True)
        keep = keyed_uniform(key, self.salt, x.shape, x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def assign_dropout_salts(module: nn.Module) -> None:
    """Give every KeyedDropout inside `module` a distinct salt (its order of appearance)."""
    for i, m in enumerate(m for m in module.modules() if isinstance(m, KeyedDropout)):
        m.salt = i + 1


def draw_dropout_keys(n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Fresh per-sample dropout keys for one training step (int64 in [0, 2**31))."""
    return torch.randint(0, 2**31 - 1, (n,), generator=generator, dtype=torch.int64).to(device)
