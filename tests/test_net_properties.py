"""Properties of the network layers with answers from outside the code: integrals, hand-computed values and
variance identities (magnitude preservation, embedding frequencies, residual scaling, weight normalisation)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from ectune.nets.ddpmpp import Conv, GroupNorm, ResBlock, group_count, sinusoidal_features
from ectune.nets.edm2 import SILU_RMS, FourierFeatures, MPLinear, mp_blend, mp_concat, mp_silu_unit, rms_normalize


def unit_normal(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- EDM2 MP layers


def test_silu_rms_constant_is_the_gaussian_integral() -> None:
    """0.596 is √E[SiLU(z)²] for z ~ N(0, 1) (EDM2, App. B), computed here by quadrature."""
    def integrand(z: float) -> float:
        silu = z / (1 + math.exp(-z))
        return silu * silu * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    rms = math.sqrt(integrate.quad(integrand, -40, 40)[0])
    assert abs(rms - SILU_RMS) < 1e-3, rms
    y = mp_silu_unit(unit_normal(1_000_000))
    assert abs(float(y.square().mean().sqrt()) - 1) < 0.01


@pytest.mark.parametrize("t", [0.3, 0.5, 0.7])
def test_mp_blend_keeps_unit_variance(t: float) -> None:
    a, b = unit_normal(1_000_000, seed=1), unit_normal(1_000_000, seed=2)
    y = mp_blend(a, b, t)
    assert abs(float(y.var()) - 1) < 0.01
    # b's share: correlation t / √((1−t)² + t²)
    assert abs(float((y * b).mean()) - t / math.sqrt((1 - t) ** 2 + t * t)) < 0.01


def test_mp_blend_hand_values() -> None:
    # t = 0.3: (0.7·a + 0.3·b) / √0.58, √0.58 = 0.7615773
    one, zero = torch.ones(1), torch.zeros(1)
    torch.testing.assert_close(mp_blend(one, zero, 0.3), torch.tensor([0.7 / 0.7615773]), rtol=1e-6, atol=0)
    torch.testing.assert_close(mp_blend(zero, one, 0.3), torch.tensor([0.3 / 0.7615773]), rtol=1e-6, atol=0)


def test_mp_concat_unit_variance_and_balance() -> None:
    a, b = unit_normal(20_000, 3, seed=3), unit_normal(20_000, 5, seed=4)
    for t, ratio in [(0.5, 1.0), (0.3, 0.49 / 0.09)]:
        y = mp_concat(a, b, t)
        assert y.shape == (20_000, 8)
        assert abs(float(y.square().mean()) - 1) < 0.01
        # The two parts carry energy in the ratio (1−t)² : t², whatever their widths (3 vs 5 channels).
        share = float(y[:, :3].square().sum() / y[:, 3:].square().sum())
        assert abs(share / ratio - 1) < 0.02, (t, share)


def test_mp_linear_and_conv_preserve_unit_variance() -> None:
    torch.manual_seed(0)
    lin = MPLinear(256, 64).double()
    conv = MPLinear(16, 32, (3, 3)).double()
    with torch.no_grad():
        lin.weight.mul_(3.0)  # the stored scale must not matter
        assert abs(float(lin(unit_normal(8192, 256)).var()) - 1) < 0.03
        assert abs(float(lin(unit_normal(8192, 256), gain=2.5).var()) - 2.5**2) < 0.1
        y = conv(unit_normal(16, 16, 24, 24, seed=5))[:, :, 1:-1, 1:-1]  # interior: no zero padding involved
        assert abs(float(y.var()) - 1) < 0.03


def test_rms_normalize_hand_value() -> None:
    x = torch.tensor([[3.0, 4.0]])  # RMS = √(25/2) = 3.5355339
    torch.testing.assert_close(rms_normalize(x, dim=1), x / (1e-4 + 3.5355339), rtol=1e-6, atol=0)


def test_forced_weight_normalisation_is_idempotent_and_scale_free() -> None:
    torch.manual_seed(1)
    layer = MPLinear(32, 16, (3, 3)).double()  # float64: the ε² = 1e-8 effect, not fp32 round-off, is checked
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(5.0)
        before = layer(x)
        rms0 = layer.weight.flatten(1).square().mean(1).sqrt()
        layer.normalize_weight_()
        rms = layer.weight.flatten(1).square().mean(1).sqrt()
        torch.testing.assert_close(rms, rms0 / (1e-4 + rms0), rtol=1e-6, atol=0)  # row RMS → 1, with ε = 1e-4
        once, after_once = layer.weight.clone(), layer(x)
        # The function changes only by ε relative to the row RMS (1e-4 now, 2e-5 before).
        torch.testing.assert_close(after_once, before, rtol=2e-4, atol=1e-6)
        layer.normalize_weight_()
        torch.testing.assert_close(layer.weight, once, rtol=2e-4, atol=0)  # again: only the ε-sized shrink
        torch.testing.assert_close(layer(x), after_once, rtol=1e-6, atol=1e-7)  # and the function is fixed


def test_edm2_fourier_features() -> None:
    torch.manual_seed(2)
    emb = FourierFeatures(20_000)
    # f ~ N(0, (2π)²), φ ~ U(0, 2π)
    assert abs(float(emb.freqs.std()) / (2 * math.pi) - 1) < 0.03
    assert 0 <= float(emb.phases.min()) and float(emb.phases.max()) < 2 * math.pi
    c = torch.tensor([0.0, -0.7, 1.3])
    y = emb(c)
    expected = math.sqrt(2) * torch.cos(c[:, None] * emb.freqs[None] + emb.phases[None])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert (y.square().mean(dim=1) - 1).abs().max() < 0.05  # unit mean square


# ---------------------------------------------------------------------------------------------- DDPM++ layers


def test_sinusoidal_features_hand_values() -> None:
    # 8 channels: n = 4 frequencies ω_i = 10⁴^(−i/3): 1, 0.046415888, 0.0021544347, 1e-4 (first and last exact).
    omega = torch.tensor([1.0, 0.046415888, 0.0021544347, 1e-4], dtype=torch.float64)
    c = torch.tensor([2.0, -0.5])
    y = sinusoidal_features(c, 8).double()
    angle = c.double()[:, None] * omega[None]
    torch.testing.assert_close(y, torch.cat([angle.sin(), angle.cos()], dim=1), rtol=1e-6, atol=1e-7)


def test_group_count() -> None:
    # EDM's min(32, C/4) where it divides C; else the largest divisor below it.
    assert [group_count(c) for c in (16, 48, 128, 256, 512, 144, 3, 40)] == [4, 12, 32, 32, 32, 24, 1, 10]


def test_group_norm_normalises_each_group() -> None:
    norm = GroupNorm(16)  # 4 groups of 4 channels, unit weight, zero bias
    x = unit_normal(3, 16, 5, 5, seed=6).float() * 7 + 2
    y = norm(x).reshape(3, 4, -1)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 4), atol=1e-4, rtol=0)


def test_residual_sum_is_scaled_by_sqrt_half() -> None:
    """With a zero residual branch, a block returns x·√½ (the sum of two unit-variance terms rescaled)."""
    block = ResBlock(16, 16, 8)
    with torch.no_grad():
        block.conv1.weight.zero_()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x, torch.randn(2, 8)), x * math.sqrt(0.5), rtol=1e-6, atol=0)


def test_box_resampling() -> None:
    """'down' with the [1, 1] filter is the 2×2 mean, 'up' repeats each pixel 2×2 (checked through 1×1 identity)."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    for mode, expected in [("down", torch.tensor([[2.5, 4.5], [10.5, 12.5]])),
                           ("up", x[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))]:
        conv = Conv(1, 1, 1, resample=mode)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.zero_()
            torch.testing.assert_close(conv(x)[0, 0], expected)
