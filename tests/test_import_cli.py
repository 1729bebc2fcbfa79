"""`ectune import-edm` end to end: synthetic EDM/EDM2 pickles (laid out like the public ones, built with the
helpers of test_import_edm.py) become ectune models that `info`, `sample` and `tune --init` accept; malicious or
broken pickles are refused with one clear error and their code never runs."""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ectune.cli import main
from ectune.cli.import_edm import default_preset
from ectune.config import NetConfig
from ectune.model import load_model
from ectune.nets import PAPER_CONFIGS, SMALL_CONFIGS
from conftest import FAKE_MODULE_NAMES, SystemCall, booby_trap, needs_fmnist, randomised, write_pickle




EDM_KWARGS = dict(img_resolution=32, img_channels=1, label_dim=0, model_type="SongUNet", dropout=0.13,
                  embedding_type="positional", encoder_type="standard", decoder_type="standard", augment_dim=9)
# A tiny DDPM++ for 1-channel 32×32 images, with EDM's augmentation input like the public CIFAR-10 checkpoints.
TINY_DDPMPP = dataclasses.replace(SMALL_CONFIGS["tiny"], channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                                  augment_dim=9, dropout=0.0)


def _write_edm(tmp_path: Path, persistence: Any, cfg: NetConfig, kind: str, kwargs: dict,
               loss_fn: Any = None) -> tuple[Path, Path, torch.nn.Module]:
    net = randomised(cfg)
    src, marker = booby_trap(tmp_path)
    path = tmp_path / f"{kind}-snapshot.pkl"
    write_pickle(path, persistence, net, kind, kwargs, 4, src, loss_fn=loss_fn)
    for name in FAKE_MODULE_NAMES:
        sys.modules.pop(name, None)  # importing must not need EDM's code
    return path, marker, net


@needs_fmnist
def test_import_edm_then_info_sample_and_tune(tmp_path: Path, fake_edm: Any, capsys: pytest.CaptureFixture) -> None:
    pkl, marker, net = _write_edm(tmp_path, fake_edm, TINY_DDPMPP, "edm", EDM_KWARGS)
    out = tmp_path / "imported.safetensors"
    assert main(["import-edm", str(pkl), "--out", str(out), "--preset", "fashion-mnist"]) == 0
    printed = capsys.readouterr().out
    assert "CC BY-NC-SA 4.0" in printed and "recipe 'fashion-mnist'" in printed
    assert not marker.exists()

    model, cfg, extra = load_model(out)
    assert cfg.net == dataclasses.replace(TINY_DDPMPP, dropout=0.13)  # architecture from the tensors, dropout from kwargs
    assert cfg.data.source == "fashion-mnist" and extra["kind"] == "edm" and extra["class_name"] == "EDMPrecond"
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k

    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == sum(p.numel() for p in net.parameters()) and info["objective"] == "diffusion"
    assert main(["sample", str(out), "--n", "2", "--steps", "1", "--out", str(tmp_path / "s.png")]) == 1
    assert "is a diffusion model" in capsys.readouterr().err and not (tmp_path / "s.png").exists()
    assert main(["sample", str(out), "--n", "2", "--steps", "1", "--out", str(tmp_path / "s.png"), "--force"]) == 0
    assert (tmp_path / "s.png").exists()

    # ECT tuning starts from the imported weights (one optimiser step).
    run = tmp_path / "tuned"
    assert main(["tune", "--init", str(out), "--run", str(run), "--data.split", "test", "--data.resolution", "32",
                 "--train.batch", "16", "--train.total-kimg", "0.016", "--runtime.sample-kimg", "0", "--quiet"]) == 0
    tuned, tuned_cfg, _ = load_model(run)
    assert tuned_cfg.net.augment_dim == 9 and tuned_cfg.net.dropout == 0.1  # tune keeps the architecture
    assert not marker.exists()


def test_import_edm2_with_preset_and_class_sampling(tmp_path: Path, fake_edm: Any, capsys: pytest.CaptureFixture) -> None:
    cfg = dataclasses.replace(SMALL_CONFIGS["tiny-edm2"], img_channels=3, label_dim=10, channel_mult=(1, 4), attn_resolutions=(16,),
                              num_blocks=1, dropout=0.0, dropout_res=NetConfig().dropout_res)
    pkl, marker, net = _write_edm(tmp_path, fake_edm, cfg, "edm2", dict(model_channels=16, dropout=0.1, sigma_data=0.5))
    out = tmp_path / "edm2.safetensors"
    # model_channels 16 matches no ImageNet-64 size: the command asks for a preset instead of guessing.
    assert main(["import-edm", str(pkl), "--out", str(out)]) == 1
    assert "choose one with --preset" in capsys.readouterr().err and not out.exists()
    assert main(["import-edm", str(pkl), "--out", str(out), "--kind", "edm2", "--preset", "imagenet64-s"]) == 0
    model, stored, _ = load_model(out)
    assert stored.net == dataclasses.replace(cfg, dropout=0.1) and stored.data.use_labels
    assert stored.optim.lr == 1e-3 and stored.ema.kind == "power"  # the rest of the recipe is the preset's
    assert main(["sample", str(out), "--n", "2", "--class", "3", "--out", str(tmp_path / "c.npz"), "--force"]) == 0
    assert not marker.exists()


def test_import_ect_snapshot(tmp_path: Path, fake_edm: Any, capsys: pytest.CaptureFixture) -> None:
    """ECT's network-snapshot-*.pkl: the loss object next to the network holds a bound method of itself."""
    import training.loss

    loss = training.loss.PersistentLoss(booby_trap(tmp_path)[0])
    pkl, marker, net = _write_edm(tmp_path, fake_edm, TINY_DDPMPP, "edm", EDM_KWARGS, loss_fn=loss)
    out = tmp_path / "ect.safetensors"
    assert main(["import-edm", str(pkl), "--out", str(out)]) == 0
    assert "imported edm EDMPrecond" in capsys.readouterr().out
    model, cfg, _ = load_model(out)
    assert cfg.net == dataclasses.replace(TINY_DDPMPP, dropout=0.13)
    for k, v in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[k], v), k
    assert not marker.exists()


def test_import_stores_the_sampling_boundary(tmp_path: Path, fake_edm: Any, capsys: pytest.CaptureFixture) -> None:
    """`--sigma-min-shift 0.003` stores the reference code's eval-mode boundary as the model's sampling default (the
    training boundary stays exact); without it the model samples with the training boundary; a bad value writes nothing."""
    pkl, _, _ = _write_edm(tmp_path, fake_edm, TINY_DDPMPP, "edm", EDM_KWARGS)
    plain, shifted = tmp_path / "plain.safetensors", tmp_path / "shifted.safetensors"
    assert main(["import-edm", str(pkl), "--out", str(plain)]) == 0
    assert main(["import-edm", str(pkl), "--out", str(shifted), "--sigma-min-shift", "0.003"]) == 0
    assert load_model(plain)[1].sample.sigma_min_shift is None
    cfg = load_model(shifted)[1]
    assert cfg.sample.sigma_min_shift == 0.003 and cfg.precond.sigma_min_shift == 0.0
    bad = tmp_path / "bad.safetensors"
    assert main(["import-edm", str(pkl), "--out", str(bad), "--sigma-min-shift", "-1"]) == 1
    assert "sampling boundary" in capsys.readouterr().err and not bad.exists()


def test_default_preset_follows_the_network() -> None:
    assert default_preset(PAPER_CONFIGS["cifar10-ddpmpp"], Path("x.pkl")) == "cifar10"
    for size in ("s", "m", "l", "xl"):
        assert default_preset(PAPER_CONFIGS[f"img64-{size}"], Path("x.pkl")) == f"imagenet64-{size}"


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker, path, out = tmp_path / "PWNED", tmp_path / "evil.pkl", tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"ema": SystemCall(f"touch {marker}")}, protocol=4))
    assert main(["import-edm", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "refusing to load global" in err and "system" in err
    assert not marker.exists() and not out.exists()


def test_broken_inputs_give_one_clear_error(tmp_path: Path, fake_edm: Any, capsys: pytest.CaptureFixture) -> None:
    pkl, _, _ = _write_edm(tmp_path, fake_edm, TINY_DDPMPP, "edm", EDM_KWARGS)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    cases = [
        (["import-edm", str(tmp_path / "missing.pkl"), "--out", str(tmp_path / "m.safetensors")], "no such file"),
        (["import-edm", str(cut), "--out", str(tmp_path / "c.safetensors")], "not a readable EDM/EDM2 network pickle"),
        (["import-edm", str(pkl), "--out", str(tmp_path / "m.pt")], "must end in .safetensors"),
        (["import-edm", str(pkl), "--out", str(tmp_path / "k.safetensors"), "--kind", "edm2"], "--kind edm2"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert expected in err and err.startswith("ectune import-edm: error:"), err
