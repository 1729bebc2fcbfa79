"""Latent-space pieces: the EDM2 normalisation (hand values), the keyed posterior draw (recomputed independently),
the VAE loaded by path through diffusers, `ectune encode-latents` (values, labels, resumption, refusals) and the
latent data source. The tiny VAE is randomly initialised (real weights come from the Hub, unreachable offline)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.cli import main
from ectune.config import DataConfig
from ectune.data import DataError, ImageDataset, load_batch, open_dataset
from ectune.latents import EDM2_RAW_MEAN, EDM2_RAW_STD, LatentNorm
from conftest import save_tiny_vae, write_png_classes

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def test_normalisation_hand_values_and_round_trip() -> None:
    norm = LatentNorm()
    m, s = torch.tensor(EDM2_RAW_MEAN).view(1, 4, 1, 1), torch.tensor(EDM2_RAW_STD).view(1, 4, 1, 1)
    # raw = mean -> 0; raw = mean + std -> 0.5; raw = mean − 2·std -> −1 (exact in float32 for these values)
    raw = torch.cat([m, m + s, m - 2 * s]).expand(3, 4, 2, 2)
    want = torch.tensor([0.0, 0.5, -1.0]).view(3, 1, 1, 1).expand(3, 4, 2, 2)
    torch.testing.assert_close(norm.normalize(raw), want, atol=1e-6, rtol=0)
    # channel 0 by hand: (1.0 − 5.81)·0.5/4.17 = −0.576738...
    assert norm.normalize(torch.ones(1, 4, 1, 1))[0, 0, 0, 0].item() == pytest.approx((1 - 5.81) * 0.5 / 4.17, abs=1e-6)
    x = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm.normalize(norm.denormalize(x)), x, atol=2e-6, rtol=0)
    torch.testing.assert_close(norm.normalize_std(torch.ones(1, 4, 1, 1)).flatten(),
                               torch.tensor([0.5 / v for v in EDM2_RAW_STD]))
    with pytest.raises(ValueError, match="one raw mean and one raw std per latent channel"):
        LatentNorm(raw_mean=(0.0, 1.0), raw_std=(1.0,))
    with pytest.raises(ValueError, match=r"expected latents \[N, 4, H, W\]"):
        norm.normalize(torch.zeros(1, 3, 2, 2))


def _independent_eps(seed: int, position: int, shape: tuple[int, ...]) -> torch.Tensor:
    key = hashlib.blake2b(f"ectune-latent-noise:{seed}:{position}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
    return torch.randn(shape, generator=g)


def test_posterior_draw_is_mean_plus_std_times_keyed_noise() -> None:
    g = torch.Generator().manual_seed(1)
    mean, std = torch.randn(6, 4, 2, 2, generator=g), torch.rand(6, 4, 2, 2, generator=g)
    ds = ImageDataset(mean, None, 0, "latents", images_std=std)
    idx, pos = torch.tensor([4, 1, 4]), torch.tensor([10, 11, 16])  # image 4 seen at positions 10 and 16 (two epochs)
    x, _ = load_batch(ds, idx, positions=pos, seed=7)
    for b in range(3):
        want = mean[idx[b]] + std[idx[b]] * _independent_eps(7, int(pos[b]), (4, 2, 2))
        assert torch.equal(x[b], want)
    assert not torch.equal(x[0], x[2])  # a fresh draw per image seen
    # Batch-size independence: the rows of a larger batch are the same draws.
    x2, _ = load_batch(ds, torch.tensor([1, 4]), positions=torch.tensor([11, 16]), seed=7)
    assert torch.equal(x2, x[1:])
    assert torch.equal(load_batch(ds, idx)[0], mean[idx])  # without positions: the posterior mean
    with pytest.raises(DataError, match="images_std"):
        ImageDataset(mean, None, 0, "bad", images_std=std[:2])


def test_training_draws_a_fresh_posterior_latent_per_image_seen(monkeypatch) -> None:
    """The training step gives each row its position (images seen) and the run's seed: row b of the step at nimg is
    mean + std·ε(seed, nimg + b), ε recomputed independently here."""
    from ectune.data import global_indices
    from ectune.model import build_model
    from ectune.nets import SMALL_CONFIGS
    from ectune.objectives import LossSpec
    from ectune.presets import get_preset
    from ectune.runtime import distributed as rt_dist
    from ectune.training import step
    from ectune.training.fastpath import FastPath

    cfg = get_preset("fashion-mnist", "pretrain")
    net = replace(SMALL_CONFIGS["tiny"], img_channels=4, img_resolution=8, model_channels=16, channel_mult=(1,),
                  num_blocks=1, attn_resolutions=())
    cfg = replace(cfg, net=net, train=replace(cfg.train, batch=4, seed=5))
    g = torch.Generator().manual_seed(2)
    mean, std = torch.randn(10, 4, 8, 8, generator=g), torch.rand(10, 4, 8, 8, generator=g)
    data = ImageDataset(mean, None, 0, "latents", images_std=std)
    seen = []
    real = step.to_model_input
    monkeypatch.setattr(step, "to_model_input", lambda images, **k: seen.append(images) or real(images, **k))
    model = build_model(cfg)
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=torch.device("cpu"))
    opt = step.make_optimizer(cfg, list(model.net.parameters()), torch.device("cpu"))
    nimg = 12
    step.training_step(fast=fast, opt=opt, data=data, cfg=cfg, spec=LossSpec(), nimg=nimg, dist=rt_dist.Dist())
    idx = global_indices(10, seed=5, start=nimg, count=4)
    want = torch.stack([mean[i] + std[i] * _independent_eps(5, nimg + b, (4, 8, 8)) for b, i in enumerate(idx)])
    assert torch.equal(seen[0], want)


def test_vae_loads_by_path_and_reports_bad_sources(vae_dir: Path, tmp_path: Path) -> None:
    from ectune.latents import load_vae

    vae = load_vae(str(vae_dir))
    assert (vae.latent_channels, vae.factor) == (4, 2)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(images)
    assert mean.shape == std.shape == (3, 4, 8, 8) and bool((std > 0).all())
    from ectune.latents import DiffusersVAE

    torch.testing.assert_close(DiffusersVAE(str(vae_dir), batch=1).encode(images)[0], mean)  # batching changes nothing
    assert vae.decode(mean).shape == (3, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path / "missing-vae"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="cannot load the VAE"):
        load_vae(str(tmp_path / "broken"))


def _encode(images: Path, out: Path, vae_dir: Path, *extra: str) -> int:
    return main(["encode-latents", str(images), str(out), "--resolution", "16", "--vae", str(vae_dir),
                 "--shard-size", "3", "--device", "cpu", *extra])


def test_encode_latents_values_labels_and_resumption(vae_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    images = write_png_classes(tmp_path / "imgs")  # 4 images 24×20, classes a (0) and b (1)
    out = tmp_path / "lat"
    assert _encode(images, out, vae_dir, "--store-posterior") == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["count"] == 4 and meta["shards"] == ["latents-00000.safetensors", "latents-00001.safetensors"]
    assert meta["latent_shape"] == [4, 8, 8] and meta["posterior"] is True
    assert meta["labels"] == [["a/0.png", 0], ["a/1.png", 0], ["b/0.png", 1], ["b/1.png", 1]]

    # Independently: centre crop 20×20 of the 24×20 image, resize to 16 (Lanczos), encode, normalise by hand.
    img = Image.open(images / "b" / "0.png").crop((2, 0, 22, 20)).resize((16, 16), Image.Resampling.LANCZOS)
    px = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    with torch.no_grad():
        dist = vae.encode(px).latent_dist
    m, s = torch.tensor(EDM2_RAW_MEAN).view(1, 4, 1, 1), torch.tensor(EDM2_RAW_STD).view(1, 4, 1, 1)
    ds = open_dataset(DataConfig(source="latents", path=str(out), use_labels=True, vae=str(vae_dir),
                                 latent_mean=EDM2_RAW_MEAN, latent_std=EDM2_RAW_STD))
    assert ds.images.shape == (4, 4, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1] and ds.num_classes == 2
    torch.testing.assert_close(ds.images[2:3], (dist.mean - m) * 0.5 / s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ds.images_std[2:3], dist.std * 0.5 / s, atol=1e-5, rtol=1e-5)

    # Resumption: done shards are kept, a missing one is rewritten; other settings are refused.
    first, second = out / meta["shards"][0], out / meta["shards"][1]
    stamp = first.stat().st_mtime_ns
    second.unlink()
    (out / "dataset.json").unlink()
    with pytest.raises(DataError, match="did not finish"):
        open_dataset(DataConfig(source="latents", path=str(out), vae=str(vae_dir), latent_mean=EDM2_RAW_MEAN,
                                latent_std=EDM2_RAW_STD))
    assert _encode(images, out, vae_dir, "--store-posterior") == 0
    assert first.stat().st_mtime_ns == stamp and second.is_file()
    assert torch.equal(open_dataset(DataConfig(source="latents", path=str(out), vae=str(vae_dir),
                                               latent_mean=EDM2_RAW_MEAN, latent_std=EDM2_RAW_STD)).images, ds.images)
    assert _encode(images, out, vae_dir) == 1  # without --store-posterior: other settings, refused


def test_latent_source_checks_the_config_against_the_dataset(vae_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    images = write_png_classes(tmp_path / "imgs", n_per_class=1)
    out = tmp_path / "lat"
    assert _encode(images, out, vae_dir) == 0
    good = DataConfig(source="latents", path=str(out), vae=str(vae_dir), latent_mean=EDM2_RAW_MEAN,
                      latent_std=EDM2_RAW_STD)
    ds = open_dataset(good)
    assert ds.is_latent and ds.images_std is None and ds.labels is None
    with pytest.raises(DataError, match="--data.latent-std 4.17 4.62 3.71 3.28"):
        open_dataset(replace(good, latent_std=(1.0, 1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="--data.vae"):
        DataConfig(source="latents", path=str(out))
    with pytest.raises(ValueError, match="--data.latent-std"):
        DataConfig(vae="x", latent_mean=(0.0,), latent_std=(0.0,))
    assert main(["encode-latents", str(tmp_path / "nope"), str(out / "x"), "--vae", str(vae_dir)]) == 1
    assert "IMAGES" in capsys.readouterr().err
    assert _encode(images, tmp_path / "lat2", vae_dir, "--latent-mean", "0", "--latent-std", "1") == 1
    assert "4 latent channels" in capsys.readouterr().err


def test_importing_ectune_does_not_import_diffusers() -> None:
    code = ("import sys, ectune, ectune.latents, ectune.guidance, ectune.model, ectune.presets, ectune.cli.sample, "
            "ectune.cli.encode_latents; print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
