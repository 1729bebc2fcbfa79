import dataclasses
import math

import pytest
import torch

from ectune.sampling import consistency_sample, generate, heun_sample, per_sample_normal, to_uint8
from ectune.schedules import consistency_sigmas, heun_sigmas

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
    x = consistency_sample(ideal_consistency, z * 80.0, [80.0])
    assert torch.allclose(x.double(), exact_ode_solution(z, 80.0), rtol=1e-6, atol=1e-7)


def test_two_step_ideal_sampler_has_the_data_distribution():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 1, 2, 2, generator=g)
    x = consistency_sample(ideal_consistency, z * 80.0, consistency_sigmas(2, t_max=80.0, mid_t=(0.821,)),
                           noise=lambda i: torch.randn(z.shape, generator=g))
    # f(x1 + τz) with x1 ~ N(0, S²·T²/(S²+T²)): variance S²·(S²T²/(S²+T²) + τ²)/(S² + τ²)
    var = S**2 * (S**2 * 80**2 / (S**2 + 80**2) + 0.821**2) / (S**2 + 0.821**2)
    assert x.var().item() == pytest.approx(var, rel=0.03)


def test_heun_converges_at_second_order():
    z = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = exact_ode_solution(z, 80.0)
    errors = []
    for n in (8, 16, 32, 64):
        x = heun_sample(ideal_denoiser, z * 80.0, heun_sigmas(n, sigma_min=1e-4, sigma_max=80.0))
        errors.append((x.double() - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r > 3.0 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-2  # 64 Heun steps; 8 steps are ~0.7 off on this stiff (S=0.5, T=80) problem


def test_heun_nfe():
    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(1)
        return ideal_denoiser(x, sigma)

    heun_sample(counting, torch.randn(2, 1, 2, 2) * 80.0, heun_sigmas(18))
    assert len(calls) == 35


def test_per_sample_seeds_are_batch_invariant():
    seeds = torch.arange(10)
    full = generate(ideal_consistency, seeds, (1, 4, 4), sigmas=(80.0, 0.821))
    part = generate(ideal_consistency, seeds[3:6], (1, 4, 4), sigmas=(80.0, 0.821))
    assert torch.equal(full[3:6], part)
    assert not torch.equal(per_sample_normal(seeds[:1], (4,), stream=0), per_sample_normal(seeds[:1], (4,), stream=1))


def test_sampler_rejects_bad_times_and_to_uint8():
    with pytest.raises(ValueError, match="decreasing"):
        consistency_sample(ideal_consistency, torch.randn(1, 1, 2, 2), (0.821, 80.0))
    with pytest.raises(ValueError, match="end at 0"):
        heun_sample(ideal_denoiser, torch.randn(1, 1, 2, 2), (80.0, 0.5))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


# ------------------------------------------------------------------------------------- sampling boundary σ_min
def _small_model(**sample):
    """A random tiny DDPM++ f_θ (eval mode) and its config, with the given SampleConfig fields. Its weights are
    redrawn at unit fan-in scale: the zero-initialised output layer would make F_θ ≈ 1e-5 and hide the scalings."""
    import dataclasses

    from ectune.model import build_model
    from ectune.nets import SMALL_CONFIGS
    from ectune.presets import get_preset

    cfg = get_preset("fashion-mnist", "tune")
    net = dataclasses.replace(SMALL_CONFIGS["tiny"], model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=())
    cfg = dataclasses.replace(cfg, net=net, sample=dataclasses.replace(cfg.sample, mid_t=(0.821,), t_max=80.0, **sample))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model, cfg


def reference_sample(F, seeds, shape, ts, sigma_min, sigma_data=0.5):
    """The reference code's eval-mode sampler, by hand (REFERENCE §1 and §5): with σ_min-shifted scalings
    c_skip = σ_d²/((t−σ_min)²+σ_d²), c_out = (t−σ_min)·σ_d/√(t²+σ_d²), c_in = 1/√(t²+σ_d²), c_noise = ln(t)/4,
    x = f(t_max·z_0, t_max), then x = f(x + τ·z_i, τ); z_i the same per-sample noise streams as ectune's."""
    n = len(seeds)

    def f(x, t):
        c_skip = sigma_data**2 / ((t - sigma_min) ** 2 + sigma_data**2)
        c_out = (t - sigma_min) * sigma_data / math.sqrt(t**2 + sigma_data**2)
        c_in = 1 / math.sqrt(t**2 + sigma_data**2)
        F_x = F((c_in * x).float(), torch.full((n,), math.log(t) / 4), None, dropout_key=None).double()
        return c_skip * x + c_out * F_x

    x = f(ts[0] * per_sample_normal(seeds, shape, stream=0).double(), ts[0])
    for i, tau in enumerate(ts[1:], start=1):
        x = f(x + tau * per_sample_normal(seeds, shape, stream=i).double(), tau)
    return x


@pytest.mark.parametrize("sigma_min", [0.003, 0.002, 0.5])
def test_sampling_boundary_matches_the_reference_sampler(sigma_min, tmp_path):
    """A model stored with sample.sigma_min_shift samples (1 step at t_max = 80, 2 steps with mid-t 0.821) exactly as
    the hand-written reference sampler; the training boundary (precond) stays unshifted."""
    from ectune.model import load_model, sample_images
    from ectune.runtime.checkpoint import save_model

    model, cfg = _small_model(sigma_min_shift=sigma_min)
    assert cfg.precond.sigma_min_shift == 0.0
    save_model(tmp_path / "m.safetensors", model.net.state_dict(), cfg)
    model, cfg, _ = load_model(tmp_path / "m.safetensors")  # the boundary travels in the model file's metadata
    assert cfg.sample.sigma_min_shift == sigma_min and model.sigma_min_shift == 0.0
    seeds, shape = torch.arange(5), (1, 32, 32)
    for steps, ts in ((1, (80.0,)), (2, (80.0, 0.821))):
        ours = sample_images(model, cfg, seeds, steps=steps).double()
        ref = reference_sample(model.net, seeds, shape, ts, sigma_min)
        assert (ours - ref).abs().max().item() < 1e-5, steps
        unshifted = reference_sample(model.net, seeds, shape, ts, 0.0)
        if steps == 2 or sigma_min > 0.1:  # at t = 80 a shift of 0.003 moves c_out by only 4e-5 relative
            assert (ours - unshifted).abs().max().item() > 1e-3, steps


def test_default_sampling_boundary_is_exact_and_follows_training():
    """No shift by default: f(x, 0) = x exactly and samples match the unshifted reference sampler. Unset, the
    sampling boundary is the training one; set, it is independent of it."""
    from ectune.model import sample_images, sampling_boundary
    from ectune.precond import replace_precond

    model, cfg = _small_model()
    assert cfg.sample.sigma_min_shift is None and sampling_boundary(cfg) == 0.0
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(replace_precond(model, sigma_min_shift=sampling_boundary(cfg))(x, torch.zeros(3)), x)
    seeds, shape = torch.arange(3), (1, 32, 32)
    ours = sample_images(model, cfg, seeds, steps=2).double()
    assert (ours - reference_sample(model.net, seeds, shape, (80.0, 0.821), 0.0)).abs().max().item() < 1e-5

    import dataclasses

    trained_shifted = dataclasses.replace(cfg, precond=dataclasses.replace(cfg.precond, sigma_min_shift=0.002))
    assert sampling_boundary(trained_shifted) == 0.002
    exact = dataclasses.replace(trained_shifted, sample=dataclasses.replace(cfg.sample, sigma_min_shift=0.0))
    assert sampling_boundary(exact) == 0.0
    with pytest.raises(ValueError, match="sampling boundary"):
        sampling_boundary(dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sigma_min_shift=-0.1)))


def test_sample_cli_sets_the_boundary(tmp_path, monkeypatch):
    """`ectune sample --sigma-min-shift S` samples with S whatever the model file stores; without it, the stored one."""
    import ectune.model
    from ectune.cli import main
    from ectune.runtime.checkpoint import save_model

    model, cfg = _small_model(sigma_min_shift=0.002)
    save_model(tmp_path / "m.safetensors", model.net.state_dict(), cfg)
    seen = []
    real = ectune.model.sample_images
    monkeypatch.setattr(ectune.model, "sample_images", lambda m, c, *a, **k: seen.append(c.sample.sigma_min_shift) or real(m, c, *a, **k))
    for flag in (["--sigma-min-shift", "0.003"], []):
        assert main(["sample", str(tmp_path / "m.safetensors"), "--n", "2", "--out", str(tmp_path / "x.npz"), *flag]) == 0
    assert seen == [0.003, 0.002]


def test_grids_of_a_few_class_model_hold_one_class_per_column():
    from ectune.config import RunConfig
    from ectune.model import grid_seeds

    def grid(label_dim):
        cfg = RunConfig()
        return grid_seeds(dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, label_dim=label_dim)))

    seeds, cols = grid(10)
    assert (len(seeds), cols) == (80, 10)
    # sample_images gives seed i the class i mod 10: every row of the grid reads 0..9
    assert torch.equal(seeds.reshape(8, 10) % 10, torch.arange(10).expand(8, 10))
    for label_dim in (0, 1000):  # unconditional, or too many classes for columns: 8 × 8
        seeds, cols = grid(label_dim)
        assert (len(seeds), cols) == (64, 8)
