"""Samplers (REFERENCE §5). All share one signature, in the k-diffusion manner:

    sampler(model, x, sigmas, *, class_labels=None, ...) -> x_0

where `x` = σ_0·z is noise at the first time, `sigmas` the decreasing time grid (built in `ectune.schedules`) and
`model(x, sigma, class_labels)` a denoiser or consistency function. Randomness comes from per-sample seeds, so
sample i is the same whatever the batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


Model = Callable[..., Tensor]


def per_sample_normal(
    seeds: Tensor, shape: Sequence[int], *, stream: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard-normal noise [N, *shape] whose row n depends only on (seeds[n], stream).

    Drawn on the CPU with one generator per sample, so it is identical on every device and batch size.
    """
    rows = []
    g = torch.Generator()
    for s in seeds.tolist():
        g.manual_seed((int(s) * 1_000_003 + stream * 7_919) & 0x7FFF_FFFF_FFFF_FFFF)
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows).to(device)


@torch.no_grad()
def consistency_sample(
    model: Model,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
    noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """Multistep consistency sampling from x = σ_0·z: x ← f(x, σ_0); then for each later σ_i,
    x ← f(x + σ_i·z_i, σ_i) (stochastic re-noising as in iCT). `sigmas` decrease, e.g. (80,) for 1 step or
    (80, 0.821) for 2 (`schedules.consistency_sigmas`); noise(i) gives z_i (default: torch.randn_like)."""
    ts = [float(s) for s in sigmas]
    if not ts:
        raise ValueError("consistency_sample needs at least one time in sigmas")
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= 0:
        raise ValueError(f"sampling times must be positive and strictly decreasing, got {ts}")
    x = model(x.float(), torch.full((x.shape[0],), ts[0], device=x.device), class_labels)
    for i, tau in enumerate(ts[1:], start=1):
        z = noise(i) if noise is not None else torch.randn_like(x)
        x = model(x + tau * z.to(x), torch.full((x.shape[0],), tau, device=x.device), class_labels)
    return x


@torch.no_grad()
def heun_sample(
    model: Model,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    class_labels: Tensor | None = None,
) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler for the PF-ODE dx/dt = (x − D(x, t))/t, from x = σ_0·z along
    decreasing `sigmas` that end at 0 (`schedules.heun_sigmas`); the last step is Euler: 2·(len − 1) − 1 NFE."""
    ts = [float(s) for s in sigmas]
    if len(ts) < 2 or ts[-1] != 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"Heun sampling times must be strictly decreasing and end at 0, got {ts}")
    n = x.shape[0]
    x = x.double()

    def slope(x: Tensor, t: float) -> Tensor:
        d = model(x.float(), torch.full((n,), t, device=x.device), class_labels).double()
        return (x - d) / t

    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        d_cur = slope(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if t_next > 0:  # 2nd-order correction
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + slope(x_next, t_next))
        x = x_next
    return x.float()


SAMPLERS: dict[str, Callable[..., Tensor]] = {"consistency": consistency_sample, "heun": heun_sample}


def generate(
    model: Model,
    seeds: Tensor,
    img_shape: Sequence[int],
    *,
    sigmas: Tensor | Sequence[float],
    method: str = "consistency",
    class_labels: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images in [-1, 1] [N, *img_shape] for per-sample seeds [N], with the sampler `method` along `sigmas`."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {', '.join(SAMPLERS)}")
    x = per_sample_normal(seeds, img_shape, stream=0, device=device) * float(sigmas[0])
    options = {"noise": lambda i: per_sample_normal(seeds, img_shape, stream=i, device=device)} if method == "consistency" else {}
    return SAMPLERS[method](model, x, sigmas, class_labels=class_labels, **options)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images to uint8 [0, 255] (rounded, clamped)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
