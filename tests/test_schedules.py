"""Schedules against the hand-computed values of REFERENCE.md (to 1e-5)."""

import math

import pytest
import torch

from ectune.config import ObjectiveConfig
from ectune.objectives import draw_t_r, largest_r_over_t
from ectune.schedules import (
    consistency_sigmas, ect_max_r_over_t, ect_r, ect_stage, heun_sigmas, ict_interval_probs, ict_num_steps, ict_t_r,
    karras_sigmas, learning_rate, lognormal_t,
)


@pytest.mark.parametrize(
    "t, a, q, expected",
    [
        (1.0, 1, 2, 0.0),  # clamped
        (1.0, 3, 2, 0.606059),
        (80.0, 1, 2, 40.0),
        (0.5, 8, 2, 0.492148),
        (2.0, 1, 256, 1.984737),
        (0.002, 1, 256, 0.001961),
        (10.0, 2, 4, 9.374773),
    ],
)
def test_ect_r_sigmoid_hand_values(t, a, q, expected):
    r = ect_r(torch.tensor([t], dtype=torch.float64), a, q=q, k=8.0, b=1.0)
    assert r.item() == pytest.approx(expected, abs=1e-5)


def test_ect_r_const_mapping():
    r = ect_r(torch.tensor([1.0], dtype=torch.float64), 2, q=2, mapping="const")
    assert r.item() == pytest.approx(0.75, abs=1e-6)


def test_ect_r_stage_zero_is_diffusion_and_r_below_t():
    t = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert torch.equal(ect_r(t, 0, q=2), torch.zeros_like(t))
    for a in range(1, 10):
        r = ect_r(t, a, q=2)
        assert (r >= 0).all() and (r < t).all()
    # r/t grows towards 1 with the stage
    assert (ect_r(t, 9, q=2) >= ect_r(t, 3, q=2)).all()


def test_ect_r_unknown_mapping():
    with pytest.raises(ValueError, match="mapping"):
        ect_r(torch.ones(1), 1, q=2, mapping="linear")


@pytest.mark.parametrize("a, q, mapping, b, expected", [
    (8, 2, "sigmoid", 1.0, 1 - 1 / 256),  # cifar10's last stage: 0.99609375
    (1, 256, "sigmoid", 1.0, 1 - 1 / 256),  # the one-hour recipe
    (2, 4, "sigmoid", 1.0, 0.9375),
    (1, 2, "const", 1.0, 0.5),
    (3, 2, "sigmoid", 0.0, 1 - 5 / 8),  # b = 0: n(t) ≡ 1 + k/2 = 5
    (1, 2, "sigmoid", 0.0, 0.0),  # clamped like r
    (0, 2, "sigmoid", 1.0, 0.0),  # stage 0: diffusion
])
def test_ect_max_r_over_t_hand_values(a, q, mapping, b, expected):
    assert ect_max_r_over_t(a, q=q, b=b, mapping=mapping) == pytest.approx(expected, abs=1e-12)
    t = torch.logspace(-3, 3, 2001, dtype=torch.float64)  # r/t of actual draws approaches the bound from below
    ratio = (ect_r(t, a, q=q, b=b, mapping=mapping) / t).max().item()
    assert ratio <= expected + 1e-12 and ratio == pytest.approx(expected, abs=1e-3)


def test_largest_r_over_t_per_objective():
    ect = ObjectiveConfig(kind="ect", q=2.0, stages=8)
    assert [largest_r_over_t(ect, nimg=i * 1000, total_nimg=8000) for i in (0, 7)] == [0.5, 1 - 1 / 256]
    assert largest_r_over_t(ObjectiveConfig(kind="diffusion"), nimg=0, total_nimg=1) == 0.0
    ict = ObjectiveConfig(kind="ict", ict_fixed_n=11)  # REFERENCE §4: 80.0 → 45.31373 is the widest step
    assert largest_r_over_t(ict, nimg=0, total_nimg=1) == pytest.approx(45.31373 / 80.0, abs=1e-6)


def test_ect_stage_tuning_and_scratch():
    d = 1000
    assert ect_stage(0, d) == 1 and ect_stage(999, d) == 1 and ect_stage(1000, d) == 2
    assert ect_stage(0, d, from_scratch=True) == 0 and ect_stage(2500, d, from_scratch=True) == 2


def test_karras_sigmas_n11():
    expected = [80.0, 45.31373, 24.40834, 12.38158, 5.83895, 2.51522, 0.96542, 0.31828, 0.08509, 0.01672, 0.002]
    s = karras_sigmas(11, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.tolist() == pytest.approx(expected, abs=1e-5)


def test_sampling_grids():
    expected = [80.0, 45.31373, 24.40834, 12.38158, 5.83895, 2.51522, 0.96542, 0.31828, 0.08509, 0.01672, 0.002, 0.0]
    assert heun_sigmas(11).tolist() == pytest.approx(expected, abs=1e-5)  # REFERENCE §4's grid, then 0
    assert consistency_sigmas(1).tolist() == [80.0]
    assert consistency_sigmas(2, mid_t=(0.821, 0.1)).tolist() == [80.0, 0.821]
    with pytest.raises(ValueError, match="3 steps need 2 intermediate"):
        consistency_sigmas(3, mid_t=(0.821,))


@pytest.mark.parametrize("m, n", [(0, 11), (100_000, 21), (200_000, 81), (399_999, 1281)])
def test_ict_curriculum(m, n):
    assert ict_num_steps(m, 400_000, s0=10, s1=1280) == n


def test_ict_probs_match_lognormal_mass_and_pairs_are_adjacent():
    grid = karras_sigmas(21).flip(0)
    p = ict_interval_probs(grid, P_mean=-1.1, P_std=2.0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the interval containing exp(P_mean) (the median) carries the most mass among its neighbours
    phi = lambda x: 0.5 * (1 + math.erf((math.log(x) + 1.1) / (2.0 * math.sqrt(2))))
    raw = [phi(grid[i + 1].item()) - phi(grid[i].item()) for i in range(20)]
    total = sum(raw)
    assert p.tolist() == pytest.approx([v / total for v in raw], abs=1e-10)
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, r = ict_t_r(u, 21, sigma_min=0.002, sigma_max=80.0, rho=7.0, P_mean=-1.1, P_std=2.0)
    idx = torch.searchsorted(grid, r)
    assert torch.allclose(grid[idx + 1], t)
    freq = torch.bincount(idx, minlength=20).double() / 10_000
    assert torch.allclose(freq, p, atol=0.015)


def test_lognormal_t_and_draws():
    z = torch.tensor([0.0, 1.0])
    assert lognormal_t(z, P_mean=-1.1, P_std=2.0).tolist() == pytest.approx([math.exp(-1.1), math.exp(0.9)], rel=1e-6)
    g = torch.Generator().manual_seed(0)
    t, r = draw_t_r(ObjectiveConfig(kind="ect", q=2, stages=8), n=20_000, nimg=0, total_nimg=8000, generator=g)
    assert abs(t.log().mean().item() + 1.1) < 0.05 and abs(t.log().std().item() - 2.0) < 0.05
    assert torch.allclose(r, ect_r(t.double(), 1, q=2).float())
    t, r = draw_t_r(ObjectiveConfig(kind="diffusion"), n=10, nimg=0, total_nimg=1, generator=g)
    assert (r == 0).all()
    t, r = draw_t_r(ObjectiveConfig(kind="ect", q=2, stages=8), n=10, nimg=4500, total_nimg=8000, generator=g)
    assert torch.allclose(r, ect_r(t.double(), 5, q=2).float())  # stage ⌊4500/1000⌋ + 1


def test_learning_rate():
    assert learning_rate(5e6, lr=1e-4) == 1e-4
    assert learning_rate(100, lr=1e-3, schedule="invsqrt", t_ref_nimg=256_000) == 1e-3
    assert learning_rate(4 * 256_000, lr=1e-3, schedule="invsqrt", t_ref_nimg=256_000) == pytest.approx(5e-4)
    assert learning_rate(50, lr=1.0, warmup_nimg=100) == 0.5


def test_last_stage_start_hand_values():
    from ectune.objectives import last_stage_start, stage

    two = ObjectiveConfig(kind="ect", q=4, stages=2)  # the fashion-mnist tune preset: d = 12000 of 24000
    assert last_stage_start(two, total_nimg=24_000) == 12_000
    # d = 1000/3 = 333.3…: ⌊2·d⌋ = 666 is still stage 2; the last stage (3) starts at 667.
    three = ObjectiveConfig(kind="ect", stages=3)
    assert last_stage_start(three, total_nimg=1000) == 667
    assert (stage(three, nimg=666, total_nimg=1000), stage(three, nimg=667, total_nimg=1000)) == (2, 3)
    # a fixed stage length: 25.6M images in stages of 3.2M; the eighth starts at 22.4M
    fixed = ObjectiveConfig(kind="ect", stage_kimg=3200.0)
    assert last_stage_start(fixed, total_nimg=25_600_000) == 22_400_000
