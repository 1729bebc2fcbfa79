"""torch.distributed helpers. Launch with torchrun; a plain `python`/`ectune` run is a world of one.

NCCL on CUDA, gloo on CPU. Only rank 0 writes files; statistics are reduced across ranks.
Work that is split by seeds (sampling, evaluation) uses `rank_seeds` to give each rank a contiguous slice and
`all_gather_cat` to put the slices back together in seed order, so the result equals a one-process run.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_seeds(seeds: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of `seeds` [N]: slices of ranks 0..world-1, concatenated, give `seeds` back.

    Sizes differ by at most one (the first N % world ranks get one more). Every sample is a function of its own
    seed, so sampling the slices on `world` processes and gathering them equals one process sampling all seeds.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} process(es)")
    if seeds.ndim != 1:
        raise ValueError(f"seeds must be a 1-D tensor, got shape {tuple(seeds.shape)}")
    return torch.tensor_split(seeds, world)[rank]


def all_gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` [n_rank, ...] concatenated along dim 0 in rank order (n_rank may differ by rank).

    The inverse of `rank_seeds`: all ranks get the full result, on the device of `local`. Gather compact data
    (e.g. uint8 images or features) since every rank holds the whole result. Without a process group this
    returns `local` unchanged.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    device, world = _comm_device(), dist.get_world_size()
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[dist.get_rank()] = local.shape[0]
    dist.all_reduce(counts)
    longest = int(counts.max())
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, counts.tolist())]).to(local.device)


def check_same_across_ranks(value: int, *, what: str) -> None:
    """Fail with one clear error when ranks disagree on an integer (e.g. the images seen they resumed from).

    Resuming reads the run directory on every rank, so all nodes must see the same run directory (a shared
    filesystem); otherwise ranks would silently train from different states.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    device = _comm_device()
    low = torch.tensor([value], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise RuntimeError(
            f"ranks disagree on the {what}: rank {dist.get_rank()} has {value}, others range from {int(low)} to "
            f"{int(high)}; every node must see the same run directory (put --run on a shared filesystem)"
        )


def max_across_ranks(value: int) -> int:
    """The largest of every rank's `value` (all ranks get it); `value` itself without a process group."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group: collect garbage, wait for every rank, then destroy the group.

    DDP's reducer lives in reference cycles that hold the backend's pending work. If the interpreter frees them at
    exit instead, a rank can abort with "terminate called without an active exception" after all its work is
    done, and torchrun reports the whole run as failed (measured with two gloo ranks: 1 in 10 runs with
    destroy_process_group alone, 0 in 20 once garbage is collected first).
    """
    if not is_initialized():
        return
    gc.collect()
    barrier()
    dist.destroy_process_group()
