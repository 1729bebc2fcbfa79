"""Keyed dropout: a dropout mask that is a pure function of (per-sample key, layer salt, element index).

ECT's target pass must see the same dropout mask as the student pass (REFERENCE §3.4), while rows whose
r = 0 skip the target pass entirely. Replaying the global RNG cannot give both (a sub-batch consumes the
random stream differently), so each sample carries an integer key and every dropout layer hashes
(key, salt, position) into its mask. Row i's mask is then identical in any sub-batch, any batch size and
on any number of GPUs, and the computation is plain tensor maths that torch.compile fuses.

In eager mode the hashing itself is avoidable work: the student pass already made every mask (and autograd keeps
it for the backward pass). Inside `masks_recorded(tape)` each layer puts its mask on the tape, and inside
`masks_replayed(tape, rows)` each layer takes rows `rows` of it instead of hashing: the same masks, bit for bit.
Compiled code ignores the tape and hashes, which inductor fuses into the masking kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import struct
import sys
from collections.abc import Iterator

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


def _row_hashes(key: Tensor, salt: int, index: Tensor, *, device: torch.device) -> Tensor:
    """h[n, i] = lowbias32(seed(key[n], salt) + lowbias32(index[i])) for an int32 index tensor, as int32 [N, len]."""
    seed = hash32((key.to(device=device, dtype=torch.int64) & _MASK32) ^ ((salt * _GOLDEN) & _MASK32))
    seed = torch.where(seed >= (1 << 31), seed - (1 << 32), seed).to(torch.int32)
    # Positions are hashed before any multiplication by a large constant: inductor folds affine maths on an
    # arange into Triton index expressions, where constants beyond int32 are rejected at compile time
    # (benchmarks/triton_build.py --bad-control).
    return _hash32_i32(seed[:, None] + _hash32_i32(index)[None, :])


def keyed_int16(key: Tensor, salt: int, shape: torch.Size, *, device: torch.device) -> Tensor:
    """One signed 16-bit draw per element of `shape` = (N, ...), row n a function of (key[n], salt) only.

    Each 32-bit hash gives two draws, its low half (even element) and its high half (odd element): half the
    hashing of one hash per element. In eager mode the hashing is most of a dropout layer's memory traffic, so
    the halves come from reinterpreting the int32 buffer as int16 (free). A traced graph (torch.compile) instead
    computes each element's draw on its own from its index (hash j // 2, take half j % 2): pure element-wise maths
    with no interleaving step, which inductor fuses into the kernel that applies the mask, in whatever memory
    layout that kernel uses, so no hash or draw tensor is ever written. Both give the same numbers.
    """
    per_row = int(torch.Size(shape[1:]).numel())
    if torch.compiler.is_compiling() or sys.byteorder != "little":
        j = torch.arange(per_row, device=device, dtype=torch.int32)
        h = _row_hashes(key, salt, j // 2, device=device)
        low = ((h & 0xFFFF) ^ 0x8000) - 0x8000  # sign-extend the low half
        return torch.where(j % 2 == 1, h >> 16, low).to(torch.int16).reshape(shape)  # >>: the signed high half
    h = _row_hashes(key, salt, torch.arange(-(-per_row // 2), device=device, dtype=torch.int32), device=device)
    return h.view(torch.int16).reshape(h.shape[0], -1)[:, :per_row].reshape(shape)  # little-endian: [low, high]


def keyed_uniform(key: Tensor, salt: int, shape: torch.Size, *, device: torch.device) -> Tensor:
    """Uniform numbers on the 16-bit grid {0, 1/2**16, ..., 1 - 1/2**16} of `shape`: u = (s + 2**15) / 2**16 for
    the draws s of `keyed_int16`."""
    return (keyed_int16(key, salt, shape, device=device).to(torch.float32) + 32768.0) * (1.0 / 65536)


def keyed_uniform_reference(key: Tensor, salt: int, shape: torch.Size) -> Tensor:
    """The same numbers as `keyed_uniform`, computed in int64 without reinterpreting memory (for tests)."""
    per_row = int(torch.Size(shape[1:]).numel())
    seed = hash32((key.to(torch.int64) & _MASK32) ^ ((salt * _GOLDEN) & _MASK32))
    pos = hash32(torch.arange(-(-per_row // 2), dtype=torch.int64))
    h = hash32((seed[:, None] + pos[None, :]) & _MASK32)
    halves = torch.stack([h & 0xFFFF, h >> 16], dim=-1).reshape(h.shape[0], -1)[:, :per_row]
    return ((halves ^ 0x8000).to(torch.float32) / 65536).reshape(shape)


def drop_threshold(p: float) -> tuple[int, float]:
    """Integer threshold T and the exact keep probability of the rule `keep ⇔ s ≥ T` on the draws s of
    `keyed_int16`, so that the mask equals `keyed_uniform(...) >= p`.

    keep ⇔ u ≥ p ⇔ s + 2**15 ≥ ⌈p·2**16⌉ (p as the fp32 number torch compares with), so the drop probability is
    ⌈p·2**16⌉/2**16, within 2**-16 of p; scaling kept values by 1/keep_prob keeps E[dropout(x)] = x exactly.
    """
    p32 = struct.unpack("f", struct.pack("f", p))[0]  # rounded as torch rounds a Python float for an fp32 tensor
    drop = math.ceil(p32 * 65536)
    return drop - 32768, (65536 - drop) / 65536


class KeyedDropout(nn.Module):
    """Dropout whose mask follows a per-sample key when one is given (else ordinary dropout).

    `salt` distinguishes layers; `assign_dropout_salts` numbers them after the network is built.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.salt = 0

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        # Threshold and scale are plain Python numbers fixed here, so a compiled graph sees them as constants.
        threshold, keep_prob = drop_threshold(float(value)) if 0.0 <= value < 1.0 else (0, 0.0)
        if keep_prob == 0.0:  # out of range, or so close to 1 that it rounds to 1 in fp32
            raise ValueError(f"dropout probability must be in [0, 1), got {value}")
        self._p, self._threshold, self._scale = float(value), threshold, 1.0 / keep_prob

    def forward(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        if not self.training or self._p == 0.0:
            return x
        if key is None:
            return nn.functional.dropout(x, self._p, training=True)
        tape = None if torch.compiler.is_compiling() else _TAPE.get()
        if tape is not None and tape.rows is not None:
            keep = tape.masks[self.salt][tape.rows]
        else:
            keep = keyed_int16(key, self.salt, x.shape, device=x.device) >= self._threshold
            if tape is not None:
                tape.masks[self.salt] = keep
        # A bool mask: one kernel fewer than casting it, and autograd saves 1 byte per element instead of 2-4.
        return x * keep * self._scale

    def extra_repr(self) -> str:
        return f"p={self._p}, salt={self.salt}"


class MaskTape:
    """The keyed-dropout masks of one pass (bool, by layer salt), for replaying rows of them in another pass."""

    def __init__(self) -> None:
        self.masks: dict[int, Tensor] = {}
        self.rows: Tensor | slice | None = None  # set while replaying


_TAPE: contextvars.ContextVar[MaskTape | None] = contextvars.ContextVar("ectune_mask_tape", default=None)


@contextlib.contextmanager
def _using(tape: MaskTape) -> Iterator[MaskTape]:
    token = _TAPE.set(tape)
    try:
        yield tape
    finally:
        _TAPE.reset(token)


def masks_recorded(tape: MaskTape) -> contextlib.AbstractContextManager[MaskTape]:
    """Every keyed dropout layer run inside puts its mask on `tape`."""
    tape.rows = None
    return _using(tape)


def masks_replayed(tape: MaskTape, rows: Tensor | slice) -> contextlib.AbstractContextManager[MaskTape]:
    """Every keyed dropout layer run inside takes rows `rows` of its recorded mask, whatever its keys: the pass must
    be over exactly those rows of the recorded pass, with the same keys."""
    tape.rows = rows
    return _using(tape)


def assign_dropout_salts(module: nn.Module) -> None:
    """Give every KeyedDropout inside `module` a distinct salt (its order of appearance)."""
    for i, m in enumerate(m for m in module.modules() if isinstance(m, KeyedDropout)):
        m.salt = i + 1


def draw_dropout_keys(n: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Fresh per-sample dropout keys for one training step (int64 in [0, 2**31))."""
    return torch.randint(0, 2**31 - 1, (n,), generator=generator, dtype=torch.int64).to(device)
