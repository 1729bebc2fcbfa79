"""Resumable, deterministic, shardable sampling as pure functions of the number of images seen.

The training data is one infinite stream of dataset indices: the concatenation of per-epoch random
permutations, epoch e's permutation drawn from a generator seeded by hash(seed, e). Position p of the stream
depends only on (n_items, seed, p), so

  * resuming at nimg needs no sampler state: the next global batch is positions nimg .. nimg + B - 1;
  * the global batch is the same for any number of ranks (each takes its rows of it);
  * sample #17 gets the same image (and, via `xflip_mask`, the same flip) whatever the batch size.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .errors import DataError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch); a stable hash, unlike Python's salted hash()."""
    digest = hashlib.blake2b(f"ectune-epoch:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@lru_cache(maxsize=4)
def _epoch_permutation(n_items: int, seed: int, epoch: int) -> Tensor:
    # Cached because consecutive batches almost always fall in the same epoch; callers only read slices
    # of it through torch.cat, which copies, so the cached tensor is never handed out to be mutated.
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n_items, generator=gen, dtype=torch.int64)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name}={value!r}, expected an integer >= {minimum}")
    return value


def global_indices(n_items: int, *, seed: int, start: int, count: int) -> Tensor:
    """Dataset indices at stream positions start .. start + count - 1, as an int64 tensor [count].

    The stream is perm_0 ++ perm_1 ++ ..., where perm_e is a uniform random permutation of range(n_items)
    seeded by hash(seed, e). Hence global_indices(n, seed=s, start=0, count=2B) equals
    cat(global_indices(n, seed=s, start=0, count=B), global_indices(n, seed=s, start=B, count=B)).
    """
    _check_int(n_items, "n_items", 1)
    _check_int(start, "start", 0)
    _check_int(count, "count", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed={seed!r}, expected an integer")
    pieces = []
    pos, end = start, start + count
    while pos < end:
        epoch, offset = divmod(pos, n_items)
        take = min(n_items - offset, end - pos)
        pieces.append(_epoch_permutation(n_items, seed, epoch)[offset : offset + take])
        pos += take
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)


def xflip_mask(positions: Tensor, *, seed: int) -> Tensor:
    """A deterministic per-sample flip decision: bool [B], True with probability 1/2 for each position.

    `positions` are stream positions (e.g. torch.arange(nimg, nimg + B), rank-sliced like the indices), so
    the flip of sample p is the same whatever the batch size or rank count, and differs between epochs.
    """
    # splitmix64 finaliser on (seed, position): numpy's uint64 arithmetic wraps modulo 2**64 by definition.
    with np.errstate(over="ignore"):
        z = positions.detach().cpu().numpy().astype(np.uint64)
        z = z + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(63)).astype(bool))
