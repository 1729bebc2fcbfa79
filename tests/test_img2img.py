"""Image-to-image sampling (`ectune sample --init-image`, `sample_images(init_images=...)`, `ECTPipeline(image=)`):
checked against f(x_img + t·ε, t) computed here from the network and the EDM scalings written out by hand, with ε
drawn from the documented per-sample seeding (seed·1000003 + stream·7919)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomised
from ectune.cli import main
from ectune.config import RunConfig, to_dict
from ectune.img2img import strength_to_t
from ectune.model import load_model, sample_images
from ectune.nets import SMALL_CONFIGS
from ectune.runtime.checkpoint import save_model

NET = replace(SMALL_CONFIGS["tiny"], img_resolution=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
              dropout=0.0)
SIGMA_DATA = 0.5


@pytest.fixture
def model8(tmp_path):
    cfg = replace(RunConfig(), net=NET)
    path = tmp_path / "m.safetensors"
    save_model(path, randomised(cfg.net).state_dict(), cfg, extra={"objective": "ect"})
    return path


def eps(seed: int, stream: int, shape=(1, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def f_direct(net, x: torch.Tensor, t: float) -> torch.Tensor:
    """f(x, t) = c_skip·x + c_out·F(c_in·x, c_noise) with the EDM scalings (REFERENCE §1), written out."""
    c_skip = SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2)
    c_out = t * SIGMA_DATA / math.sqrt(t**2 + SIGMA_DATA**2)
    c_in = 1 / math.sqrt(t**2 + SIGMA_DATA**2)
    return c_skip * x + c_out * net(c_in * x, torch.full((x.shape[0],), math.log(t) / 4), None)


def test_strength_to_t_hand_values():
    assert strength_to_t(0.6) == pytest.approx(0.375)  # 0.5·0.6/√(1 − 0.36) = 0.3/0.8
    assert strength_to_t(0.8) == pytest.approx(2 / 3)
    assert strength_to_t(1.0) == 80.0 and strength_to_t(0.99999) == 80.0  # capped at t_max
    assert strength_to_t(0.6, sigma_data=1.0, t_max=10.0) == pytest.approx(0.75)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            strength_to_t(bad)


def test_cli_init_image_is_one_consistency_step_from_the_noised_image(model8, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    x_img = torch.from_numpy(pixels).float()[None, None] / 127.5 - 1
    model, cfg, _ = load_model(model8)
    t, seeds = 0.375, (3, 4)
    x = torch.cat([x_img + t * eps(s, 0)[None] for s in seeds])
    expected = f_direct(model.net, x, t)

    got = sample_images(model, cfg, torch.tensor(seeds), steps=1, init_images=x_img, t_start=t)
    assert torch.allclose(got, expected, atol=1e-5)
    for flags in (["--t", "0.375"], ["--strength", "0.6"]):  # strength 0.6 is t = 0.375
        out = tmp_path / f"{flags[0][2:]}.npz"
        assert main(["sample", str(model8), "--init-image", str(tmp_path / "init.png"), *flags, "--n", "2",
                     "--seed", "3", "--out", str(out), "--device", "cpu"]) == 0
        u8 = np.load(out)["arr_0"]  # [N, H, W, C]
        want = ((expected + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        assert np.abs(u8.astype(int) - want.astype(int)).max() <= 1 and (u8 == want).mean() > 0.95

    # Two steps: re-noise to τ with stream 1, then f again.
    tau = 0.2
    x2 = expected + tau * torch.stack([eps(s, 1) for s in seeds])
    two = sample_images(model, cfg, torch.tensor(seeds), steps=2, mid_t=(tau,), init_images=x_img, t_start=t)
    assert torch.allclose(two, f_direct(model.net, x2, tau), atol=1e-5)
    # From a blank image at t_max it is ordinary sampling.
    blank = sample_images(model, cfg, torch.tensor(seeds), steps=2, init_images=torch.zeros(1, 1, 8, 8), t_start=80.0)
    assert torch.equal(blank, sample_images(model, cfg, torch.tensor(seeds), steps=2))


def test_init_image_options_refuse_bad_input(model8, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "sq.png")
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "wide.png")
    out = str(tmp_path / "o.png")
    cases = [
        (["--t", "0.5"], "give an --init-image"),
        (["--init-image", str(tmp_path / "sq.png"), "--t", "0.5", "--strength", "0.5"], "give one"),
        (["--init-image", str(tmp_path / "sq.png"), "--t", "0.5", "--steps", "2", "--mid-t", "0.821"], "below the starting time"),
        (["--init-image", str(tmp_path / "sq.png"), "--t", "0.5", "--steps", "2"], "pass them with --mid-t"),
        (["--init-image", str(tmp_path / "sq.png"), "--t", "90"], "--t 90.0: expected a time in (0, t_max"),
        (["--init-image", str(tmp_path / "wide.png")], "expected a square image"),
        (["--init-image", str(tmp_path / "none.png")], "no such file"),
    ]
    for flags, words in cases:
        assert main(["sample", str(model8), *flags, "--out", out, "--device", "cpu"]) == 1, flags
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (flags, err)


def test_pipeline_image_to_image(model8):
    pytest.importorskip("diffusers")
    from ectune.integrations.diffusers import ECTPipeline, ECTScheduler, ECTUNet

    model, cfg, _ = load_model(model8)
    unet = ECTUNet(run_config=to_dict(cfg))
    unet.precond.net.load_state_dict(model.net.state_dict())
    pipe = ECTPipeline(unet=unet, scheduler=ECTScheduler())
    pipe.set_progress_bar_config(disable=True)
    x_img = torch.rand(1, 1, 8, 8) * 2 - 1
    seeds = (7, 8)
    expected = f_direct(model.net, torch.cat([x_img + 0.375 * eps(s, 0)[None] for s in seeds]), 0.375)
    got = pipe(image=x_img, strength=0.6, seeds=list(seeds), num_inference_steps=1, output_type="latent").images
    assert torch.allclose(got, expected, atol=1e-5)
    # timesteps= gives the levels directly: the first is the image's noise level.
    again = pipe(image=x_img[0], timesteps=[0.375], seeds=list(seeds), output_type="latent").images
    assert torch.equal(again, got)
    pil = Image.fromarray(((x_img[0, 0] + 1) * 127.5).round().byte().numpy())
    from_pil = pipe(image=pil, strength=0.6, seeds=list(seeds), num_inference_steps=1, output_type="latent").images
    assert torch.allclose(from_pil, expected, atol=0.05)  # the PIL image is x_img rounded to 8 bits
    with pytest.raises(ValueError, match="strength= sets how much an image= is noised"):
        pipe(strength=0.5, seeds=[0])
