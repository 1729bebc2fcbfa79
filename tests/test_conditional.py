"""Class-conditional training and sampling on Fashion-MNIST labels, and the EDM2 network in the training loop
(forced weight normalisation after each step; the no-grad target pass leaves the weights alone)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from ectune.cli import main
from ectune.config import DataConfig
from ectune.data import global_indices, open_dataset
from ectune.losses import consistency_loss
from ectune.model import build_model, load_model, sample_images
from ectune.nets import SMALL_CONFIGS, DDPMppUNet, EDM2UNet
from ectune.nets.edm2 import MPLinear
from ectune.runtime.checkpoint import load_state
from ectune.training.loop import train
from conftest import TINY, needs_fmnist, tiny




class LabelRecorder:
    """Records the class-label argument every ectune network receives (the Precond passes it positionally)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor | None, bool]] = []  # (labels, training mode)

    def __enter__(self) -> "LabelRecorder":
        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, (DDPMppUNet, EDM2UNet)):
                labels = args[2] if len(args) > 2 else None
                self.calls.append((None if labels is None else labels.detach().clone(), module.training))

        self.handle = nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _assert_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    assert labels is not None and labels.dtype == torch.float32 and labels.shape[1] == num_classes
    assert torch.all((labels == 0) | (labels == 1)) and torch.all(labels.sum(1) == 1)
    return labels.argmax(1)


@needs_fmnist
def test_class_conditional_train_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "cond"
    short = ["--train.total-kimg", "0.032", "--train.batch", "16", "--runtime.sample-kimg", "0", "--quiet"]
    with LabelRecorder() as rec:
        assert main(["pretrain", "--run", str(run), *TINY, "--data.use-labels", "--net.label-dim", "10", *short]) == 0
    # Training passes one-hot labels of exactly the images drawn for each step (two steps of 16).
    data = open_dataset(DataConfig(source="fashion-mnist", split="test", resolution=32, use_labels=True))
    train_calls = [labels for labels, training in rec.calls if training]
    assert len(train_calls) == 2
    for step, labels in enumerate(train_calls):
        expected = data.labels[global_indices(len(data), seed=0, start=16 * step, count=16)]
        assert torch.equal(_assert_one_hot(labels, 10), expected)

    model, cfg, _ = load_model(run)
    assert cfg.net.label_dim == 10 and model.net.map_label is not None
    with LabelRecorder() as rec:
        assert main(["sample", str(run), "--class", "3", "--n", "4", "--steps", "1", "--force",
                     "--out", str(tmp_path / "c3.npz")]) == 0
    assert len(rec.calls) == 1 and torch.all(_assert_one_hot(rec.calls[0][0], 10) == 3)
    # Without --class the class of sample i is seed i mod 10; the label changes the output.
    with LabelRecorder() as rec:
        default = sample_images(model, cfg, torch.arange(4), steps=1)
    assert torch.equal(_assert_one_hot(rec.calls[0][0], 10), torch.arange(4))
    class3 = sample_images(model, cfg, torch.arange(4), steps=1, class_labels=torch.full((4,), 3))
    assert torch.equal(default[3], class3[3]) and not torch.equal(default[0], class3[0])
    assert main(["sample", str(run), "--class", "10", "--n", "1", "--force", "--out", str(tmp_path / "x.png")]) == 1
    assert "--class 10: the model has 10 classes" in capsys.readouterr().err


def _edm2_cfg():
    cfg = tiny("tune", total_kimg=0.048)
    net = dataclasses.replace(SMALL_CONFIGS["tiny-edm2"], channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,),
                              label_dim=10, dropout=0.1)
    return dataclasses.replace(cfg, net=net, data=dataclasses.replace(cfg.data, use_labels=True))


def _mpconv_weights(net: nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in net.named_modules() if isinstance(m, MPLinear)]


@needs_fmnist
def test_edm2_trains_with_forced_weight_normalisation(tmp_path: Path) -> None:
    cfg = _edm2_cfg()
    # A large learning rate: Adam moves every weight by ~lr per step, so without the projection the row RMS would
    # drift by ~1e-2; with it, rows sit on the sphere up to normalize's eps (RMS = 1/(1 + 1e-4), so mean square 1 − 2e-4).
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.02))
    result = train(cfg, tmp_path / "edm2", show_progress=False)
    assert result.nimg == 48 and result.skipped_steps == 0
    state = load_state(tmp_path / "edm2" / "state.pt")
    init = build_model(cfg).net.state_dict()
    names = _mpconv_weights(build_model(cfg).net)
    assert len(names) > 10
    moved = 0
    for name in names:
        w = state["net"][name].flatten(1)
        # normalize_weights_ after every step: each output row has unit RMS (norm √fan_in).
        torch.testing.assert_close(w.square().mean(1), torch.ones(w.shape[0]), atol=5e-4, rtol=0)
        moved += not torch.equal(state["net"][name], init[name])
    assert moved > len(names) // 2  # the steps really changed the weights


def test_edm2_target_pass_leaves_weights_unchanged() -> None:
    cfg = _edm2_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    with torch.no_grad():  # move weights off the unit sphere: a normalising forward pass would show up
        for name in _mpconv_weights(model.net):
            model.net.get_parameter(name).mul_(1.7)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    n = 6
    x0, eps = torch.randn(n, 1, 32, 32).clamp(-1, 1), torch.randn(n, 1, 32, 32)
    t, r = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.1, 8.0]), torch.tensor([0.4, 0.0, 1.5, 3.0, 0.0, 7.0])
    labels, keys = torch.arange(n) % 10, torch.arange(n) * 7919
    with torch.no_grad():
        model(x0 + r[:, None, None, None] * eps, r, labels, dropout_key=keys)  # the target pass alone
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    loss = consistency_loss(model, x0, t, r, eps, class_labels=labels, dropout_key=keys)  # target + student
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    loss.sum().backward()
    assert all(p.grad is not None for n_, p in model.net.named_parameters() if n_ in _mpconv_weights(model.net))


def _off_sphere(net: nn.Module) -> dict[str, torch.Tensor]:
    """The network's state with every MPLinear weight scaled off the unit sphere (per-tensor factors 0.5 … 1.7, as
    a post-hoc EMA checkpoint's rows are not unit norm) and its scalar gains at 1, as in a trained network (EDM2
    starts its output gain at 0, which zeroes every other weight's gradient)."""
    state = {k: v.clone() if v.ndim else torch.ones_like(v) for k, v in net.state_dict().items()}
    for i, name in enumerate(_mpconv_weights(net)):
        state[name] *= 0.5 + 0.4 * (i % 4)
    return state


def _unit_rms_rows(w: torch.Tensor) -> torch.Tensor:
    """Each output row divided by its root mean square (by hand, in float64)."""
    w64 = w.double()
    return (w64 / w64.flatten(1).square().mean(1).sqrt().reshape(-1, *[1] * (w.ndim - 1))).float()


def test_training_setup_normalises_edm2_weights_but_not_on_resume(tmp_path: Path) -> None:
    from ectune.ema import EMA
    from ectune.runtime.checkpoint import save_model, save_state
    from ectune.training.state import restore
    from ectune.training.step import make_optimizer
    from ectune.training.rundir import RunDir

    cfg = _edm2_cfg()
    torch.manual_seed(0)
    scaled = _off_sphere(build_model(cfg).net)
    names = _mpconv_weights(build_model(cfg).net)
    init = tmp_path / "init.safetensors"
    save_model(init, scaled, cfg)

    def set_up(init_path, run_name, start=None):
        net = build_model(cfg).net
        if start is not None:
            net.load_state_dict(start)
        opt, ema = make_optimizer(cfg, list(net.parameters()), torch.device("cpu")), EMA(net, cfg.ema)
        nimg, _ = restore(RunDir(tmp_path / run_name), cfg, net=net, opt=opt, ema=ema, init=init_path)
        return net, ema, nimg

    # --init and a fresh start: before any step, every MPLinear row has unit RMS, and the EMA starts from them.
    for init_path, start in ((init, None), (None, scaled)):
        net, ema, nimg = set_up(init_path, f"new-{init_path is None}", start)
        assert nimg == 0
        for name in names:
            w = net.state_dict()[name].flatten(1)
            assert not torch.allclose(scaled[name].flatten(1).square().mean(1), torch.ones(w.shape[0]), atol=0.1)
            # RMS s/(ε + s) with ε = 1e-4: 1 up to ε/s
            torch.testing.assert_close(w.square().mean(1).sqrt(), torch.ones(w.shape[0]), atol=2e-3, rtol=0)
        ema_weights = ema.state_dict(0)
        assert all(torch.equal(ema_weights[k], v) for k, v in net.state_dict().items())

    # A resumed state is loaded exactly as saved (normalising again would not be a no-op).
    net, ema, _ = set_up(init, "new-False")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    opt = make_optimizer(cfg, list(net.parameters()), torch.device("cpu"))
    save_state(resumed_dir / "state.pt", {"net": scaled, "opt": opt.state_dict(), "ema": ema.to_state(), "nimg": 32,
                                          "skipped": 0})
    net, _, nimg = set_up(init, "resumed")
    assert nimg == 32 and all(torch.equal(net.state_dict()[k], v) for k, v in scaled.items())


@needs_fmnist
def test_first_edm2_step_from_unnormalised_weights_equals_the_one_from_unit_rows(tmp_path: Path) -> None:
    """One Adam step tuned from an off-sphere checkpoint updates the weights as one from the same checkpoint with
    unit-RMS rows: Adam moves each element by ≈ lr whatever the scale, which turns a row of RMS s 1/s times as far,
    so without the normalisation before the first step the two would differ by ~40 % of the update."""
    cfg = _edm2_cfg()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="adam", lr=0.01))
    torch.manual_seed(0)
    scaled = _off_sphere(build_model(cfg).net)
    names = _mpconv_weights(build_model(cfg).net)
    unit = {k: _unit_rms_rows(v) if k in names else v for k, v in scaled.items()}
    from ectune.runtime.checkpoint import save_model

    after = {}
    for label, weights in (("scaled", scaled), ("unit", unit)):
        save_model(tmp_path / f"{label}.safetensors", weights, cfg)
        result = train(cfg, tmp_path / label, init=tmp_path / f"{label}.safetensors", until_kimg=0.016, show_progress=False)
        assert result.nimg == 16 and result.skipped_steps == 0
        after[label] = load_state(tmp_path / label / "state.pt")["net"]
    for name in names:
        update = (after["unit"][name] - unit[name]).norm()
        assert update > 0.5 * 0.01 * unit[name].norm(), name  # Adam moved each element by about lr = 0.01
        assert (after["scaled"][name] - after["unit"][name]).norm() < 0.02 * update, name
