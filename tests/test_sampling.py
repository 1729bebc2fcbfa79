import math

import pytest
import torch

from ectune.sampling import consistency_sample, generate, heun_sample, per_sample_normal, to_uint8

S = 0.5  # data ~ N(0, S² I)


def ideal_denoiser(x, sigma, class_labels=None):
    s = sigma.double().reshape(-1, 1, 1, 1)
    return (S**2 / (S**2 + s**2) * x.double()).float()


def ideal_consistency(x, sigma, class_labels=None):
    s = sigma.double().reshape(-1, 1, 1, 1)
    return (S / (S**2 + s**2).sqrt() * x.double()).float()


def exact_ode_solution(z, t_max):
    """PF-ODE from x(T) = T·z to t = 0 for Gaussian data: x(0) = x(T)·S/√(S² + T²)."""
    return z.double() * t_max * S / math.sqrt(S**2 + t_max**2)


def test_one_step_with_ideal_consistency_function_is_exact():
    z = torch.randn(64, 1, 4, 4, dtype=torch.float64)
    x = consistency_sample(ideal_consistency, z, ts=(80.0,))
    assert torch.allclose(x.double(), exact_ode_solution(z, 80.0), rtol=1e-6, atol=1e-7)


def test_two_step_ideal_sampler_has_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 1, 2, 2, generator=g)
    x = consistency_sample(ideal_consistency, z, ts=(80.0, 0.821), renoise=lambda i: torch.randn(z.shape, generator=g))
    # f(x1 + τz) with x1 ~ N(0, S²·T²/(S²+T²)): variance S²·(S²T²/(S²+T²) + τ²)/(S² + τ²)
    var = S**2 * (S**2 * 80**2 / (S**2 + 80**2) + 0.821**2) / (S**2 + 0.821**2)
    assert x.var().item() == pytest.approx(var, rel=0.03)


def test_heun_converges_at_second_order():
    z = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = exact_ode_solution(z, 80.0)
    errors = []
    for n in (8, 16, 32, 64):
        x = heun_sample(ideal_denoiser, z, num_steps=n, sigma_min=1e-4, sigma_max=80.0)
        errors.append((x.double() - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r > 3.0 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-2  # 64 Heun steps; 8 steps are ~0.7 off on this stiff (S=0.5, T=80) problem


def test_heun_nfe():
    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(1)
        return ideal_denoiser(x, sigma)

    heun_sample(counting, torch.randn(2, 1, 2, 2), num_steps=18)
    assert len(calls) == 35


def test_per_sample_seeds_are_batch_invariant():
    seeds = torch.arange(10)
    full = generate(ideal_consistency, seeds, (1, 4, 4), ts=(80.0, 0.821))
    part = generate(ideal_consistency, seeds[3:6], (1, 4, 4), ts=(80.0, 0.821))
    assert torch.equal(full[3:6], part)
    assert not torch.equal(per_sample_normal(seeds[:1], (4,), stream=0), per_sample_normal(seeds[:1], (4,), stream=1))


def test_sampler_rejects_bad_times_and_to_uint8():
    with pytest.raises(ValueError, match="decreasing"):
        consistency_sample(ideal_consistency, torch.randn(1, 1, 2, 2), ts=(0.821, 80.0))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]
