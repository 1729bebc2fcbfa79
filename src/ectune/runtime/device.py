"""Which torch device a command runs on (shared by training, sampling, evaluation and benchmarks), what it is, and
how much memory a run has used on it."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' (the local CUDA device if there is one, else the CPU) or an explicit device that exists here."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch {torch.__version__}); "
                         "use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def describe_hardware(device: torch.device | str) -> str:
    """One line naming the accelerator (or CPU model and core count) and the torch version, for result files."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
        name = f"CPU {name} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak allocated device memory since the last reset (CUDA), else the process's peak RSS, in GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
