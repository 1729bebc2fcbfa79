"""Latent ECT end to end on the CPU: an EDM2-512-style pickle (with its VAE encoder description) imported safely,
and images -> `encode-latents` -> `tune` (the real CLI and loop) -> `sample` (decoded, or raw latents) -> `eval`
(FD-Lite0 on decoded images against reference images). Tiny random VAE and network; shapes and plumbing are checked
here, sample quality is not (nothing at real scale runs on a CPU)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ectune.cli import main
from ectune.latents import EDM2_RAW_MEAN, EDM2_RAW_STD, LatentNorm
from ectune.model import load_model
from ectune.nets import SMALL_CONFIGS
from conftest import FAKE_MODULE_NAMES, booby_trap, randomised, save_tiny_vae, write_pickle, write_png_classes

pytest.importorskip("diffusers")

# A 4-channel EDM2 network on 8×8 latents, small enough for a few CPU steps.
TINY_LATENT = ["--net.img-resolution", "8", "--net.model-channels", "16", "--net.channel-mult", "1", "2",
               "--net.num-blocks", "1", "--net.attn-resolutions", "4", "--net.label-dim", "2"]


def test_import_edm2_512_pickle_reads_its_vae_encoder_as_data(tmp_path: Path, fake_edm: Any,
                                                              capsys: pytest.CaptureFixture) -> None:
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny-edm2"], img_channels=4, img_resolution=8, label_dim=2,
                              channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
    src, marker = booby_trap(tmp_path)
    # EDM2's StabilityVAEEncoder, as its pickle holds it: a persistent object with numpy arrays and a VAE name.
    encoder = fake_edm.Persistent("StabilityVAEEncoder", dict(
        _init_args=(), _init_kwargs={}, vae_name="stabilityai/sd-vae-ft-mse", batch_size=8,
        scale=np.float32(0.5) / np.array(EDM2_RAW_STD, dtype=np.float32), bias=np.zeros(4, dtype=np.float32)), src)
    pkl = tmp_path / "edm2-img512-tiny.pkl"
    write_pickle(pkl, fake_edm, randomised(cfg), "edm2", dict(model_channels=16), 4, src, encoder=encoder)
    for name in FAKE_MODULE_NAMES:
        sys.modules.pop(name, None)
    out = tmp_path / "m.safetensors"
    assert main(["import-edm", str(pkl), "--out", str(out), "--preset", "imagenet512-xs"]) == 0
    printed = capsys.readouterr().out
    assert "decodes with VAE stabilityai/sd-vae-ft-mse" in printed and "EDM2's published values" in printed
    assert not marker.exists()
    _, mcfg, _ = load_model(out)
    assert (mcfg.data.source, mcfg.data.vae) == ("latents", "stabilityai/sd-vae-ft-mse")
    assert mcfg.data.latent_mean == EDM2_RAW_MEAN and mcfg.data.latent_std == EDM2_RAW_STD
    assert mcfg.net.img_channels == 4 and mcfg.objective.P_mean == -0.4


def test_encode_tune_sample_decode_and_fd(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    vae = save_tiny_vae(tmp_path / "vae")
    images = write_png_classes(tmp_path / "imgs", n_per_class=2)
    lat = tmp_path / "lat"
    assert main(["encode-latents", str(images), str(lat), "--resolution", "16", "--vae", str(vae),
                 "--store-posterior", "--device", "cpu"]) == 0

    run = tmp_path / "run"
    assert main(["tune", "--preset", "imagenet512-xxs", "--run", str(run), "--data.path", str(lat),
                 "--data.vae", str(vae), *TINY_LATENT, "--train.total-kimg", "0.016", "--train.batch", "4",
                 "--runtime.status-kimg", "0.008", "--runtime.save-kimg", "0.016", "--runtime.sample-kimg", "0.016",
                 "--runtime.device", "cpu", "--quiet"]) == 0
    assert main(["tune", "--preset", "imagenet512-xxs", "--runtime.eval-kimg", "1", "--dry-run"]) == 1
    assert "ectune eval MODEL --ref IMAGES" in capsys.readouterr().err
    model, cfg, extra = load_model(run)
    assert extra["nimg"] == 16 and cfg.data.vae == str(vae) and cfg.net.img_channels == 4
    grid = Image.open(run / "samples-1step.png")  # the loop's sample grids are decoded images
    assert grid.mode == "RGB" and grid.size[0] % 16 == 0

    capsys.readouterr()
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--n", "3", "--out", str(out), "--class", "1", "--device", "cpu"]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8  # decoded: 16×16 RGB from 4×8×8 latents
    assert main(["sample", str(run), "--n", "3", "--latents", "--out", str(tmp_path / "z.npy"), "--class", "1",
                 "--device", "cpu"]) == 0
    z = torch.from_numpy(np.load(tmp_path / "z.npy"))
    assert z.shape == (3, 4, 8, 8)
    # The decoded samples are the VAE's decoding of those latents, denormalised with the EDM2 statistics.
    from diffusers import AutoencoderKL

    ref_vae = AutoencoderKL.from_pretrained(str(vae)).eval()
    with torch.no_grad():
        px = ref_vae.decode(LatentNorm().denormalize(z)).sample.clamp(-1, 1)
    want = ((px + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    got = torch.from_numpy(arr).permute(0, 3, 1, 2)
    assert (got.int() - want.int()).abs().max() <= 1  # one rounding step of slack between two CPU code paths
    assert main(["sample", str(run), "--n", "2", "--guidance", "2", "--class", "0", "--out",
                 str(tmp_path / "g.npz"), "--device", "cpu"]) == 0  # classifier-free: the zero label, 2 NFE
    assert main(["sample", str(run), "--latents", "--out", str(tmp_path / "z.png")]) == 1
    assert "--latents" in capsys.readouterr().err

    assert main(["eval", str(run), "--n", "4", "--steps", "1", "--device", "cpu", "--batch", "4"]) == 1
    assert "--ref" in capsys.readouterr().err
    ref = tmp_path / "ref.zip"
    assert main(["convert-images", str(images), str(ref), "--resolution", "16"]) == 0
    assert main(["eval", str(run), "--ref", str(ref), "--n", "4", "--steps", "1", "--device", "cpu", "--batch", "4",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["metric_name"] == "FD-Lite0" and np.isfinite(result["fd"]["1step"])
