"""Samplers (REFERENCE §5). All share one shape: sampler(model, latents, *, class_labels=None, **options),
where `latents` is unit-variance noise [N,C,H,W] and `model(x, sigma, class_labels)` is a denoiser /
consistency function. Randomness comes from per-sample seeds, so sample i is the same whatever the batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .schedules import karras_sigmas

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
    latents: Tensor,
    *,
    ts: Sequence[float] = (80.0,),
    class_labels: Tensor | None = None,
    renoise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """Multistep consistency sampling: x = f(t_0·z, t_0); then for each later τ = ts[i]:
    x = f(x + τ·z_i, τ) (stochastic re-noising as iCT). `ts` is decreasing, e.g. (80.0,) for 1 step or
    (80.0, 0.821) for 2 steps; renoise(i) gives z_i (defaults to torch.randn_like)."""
    if not ts:
        raise ValueError("consistency_sample needs at least one time in ts")
    if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= 0:
        raise ValueError(f"sampling times must be positive and strictly decreasing, got {list(ts)}")
    x = model(latents.float() * ts[0], torch.full((latents.shape[0],), ts[0], device=latents.device), class_labels)
    for i, tau in enumerate(ts[1:], start=1):
        z = renoise(i) if renoise is not None else torch.randn_like(x)
        x = model(x + tau * z.to(x), torch.full((x.shape[0],), tau, device=x.device), class_labels)
    return x


@torch.no_grad()
def heun_sample(
    model: Model,
    latents: Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    class_labels: Tensor | None = None,
) -> Tensor:
    """EDM's deterministic 2nd-order Heun sampler for the PF-ODE dx/dt = (x − D(x, t))/t.

    `num_steps` Karras times from σ_max to σ_min then 0; the last step is Euler: 2·num_steps − 1 NFE."""
    ts = torch.cat([karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho), torch.zeros(1, dtype=torch.float64)])
    ts = ts.tolist()
    n = latents.shape[0]
    x = latents.double() * ts[0]

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


def generate(
    model: Model,
    seeds: Tensor,
    img_shape: Sequence[int],
    *,
    method: str = "consistency",
    ts: Sequence[float] = (80.0,),
    heun_steps: int = 18,
    sigma_min: float = 0.002,
    class_labels: Tensor | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images in [-1, 1] [N, *img_shape] for per-sample seeds [N] with either sampler."""
    latents = per_sample_normal(seeds, img_shape, stream=0, device=device)
    if method == "consistency":
        return consistency_sample(
            model, latents, ts=ts, class_labels=class_labels,
            renoise=lambda i: per_sample_normal(seeds, img_shape, stream=i, device=device),
        )
    if method == "heun":
        return heun_sample(model, latents, num_steps=heun_steps, sigma_min=sigma_min, sigma_max=ts[0], class_labels=class_labels)
    raise ValueError(f"unknown sampling method {method!r}; expected 'consistency' or 'heun'")


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images to uint8 [0, 255] (rounded, clamped)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
