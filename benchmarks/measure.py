"""Measuring helpers shared by the benchmarks: `Stopwatch` (device-synchronised wall-clock timing),
`matmul_peak_tflops` (a large bf16 product, the MFU denominator) and `forward_flops` (FLOPs of one forward pass,
counted by torch's FlopCounterMode)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock seconds between start() and stop(), with the device synchronised at both ends."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._t0 = 0.0

    def start(self) -> "Stopwatch":
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self._t0


def matmul_peak_tflops(device: torch.device | str, *, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                       iters: int = 20, warmup: int = 3) -> float:
    """Measured TFLOP/s of an n×n×n matrix product on random data (median of `iters`, device-event timed on
    CUDA): the MFU denominator, measured in the same run as the step it is compared with."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def forward_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call of fn(*args, **kwargs) as counted by torch's FlopCounterMode (matmuls, convolutions,
    attention; elementwise work is not counted), under no_grad."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
