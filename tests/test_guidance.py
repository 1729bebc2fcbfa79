"""Guidance (ectune.guidance): the guided combination against hand values with analytic fake models, the
unconditional label, dropout keys reaching both calls, guided sampling, and the target-guidance config field."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from ectune.config import ObjectiveConfig, RunConfig
from ectune.guidance import GuidedDenoiser, unconditional_labels
from ectune.model import build_model, sample_images
from ectune.nets import SMALL_CONFIGS


class Affine(nn.Module):
    """f(x, σ, c) = a·x + σ + (class-id sum of the label vector)·10: every term is checkable by hand."""

    def __init__(self, a: float, label_dim: int) -> None:
        super().__init__()
        self.a, self.label_dim = a, label_dim
        self.calls: list[tuple] = []  # (class_labels, dropout_key) per call

    def forward(self, x, sigma, class_labels=None, *, dropout_key=None):
        self.calls.append((class_labels, dropout_key))
        label_term = 0.0
        if class_labels is not None:
            ids = torch.arange(self.label_dim, dtype=torch.float32)
            label_term = (class_labels.float() @ ids).view(-1, 1, 1, 1) * 10  # one-hot -> class id; zeros -> 0
        return self.a * x + torch.as_tensor(sigma).view(-1, 1, 1, 1) + label_term


def test_classifier_free_guidance_hand_values() -> None:
    model = Affine(2.0, label_dim=3)
    x, sigma = torch.ones(2, 1, 1, 1), torch.tensor([1.0, 1.0])
    labels = torch.eye(3)[[2, 1]]
    key = torch.tensor([5, 6])
    out = GuidedDenoiser(model, weight=3.0)(x, sigma, labels, dropout_key=key)
    # f_c = 2 + 1 + 10·id = (23, 13); f_u = 3; f_u + 3·(f_c − f_u) = (63, 33)
    assert out.flatten().tolist() == [63.0, 33.0]
    (c1, k1), (c2, k2) = model.calls
    assert torch.equal(c1, labels) and torch.equal(c2, torch.zeros(2, 3)) and k1 is key and k2 is key
    model.calls.clear()
    assert torch.equal(GuidedDenoiser(model, weight=1.0)(x, sigma, labels), model(x, sigma, labels))
    assert len(model.calls) == 2  # w = 1: one call (plus the reference call), no extra pass
    assert torch.equal(unconditional_labels(2, 3), torch.zeros(2, 3))
    # A wrapper without `label_dim` (a compiled or hinted target pass) is told the class count.
    wrapped = lambda x, s, c=None, *, dropout_key=None: model(x, s, c, dropout_key=dropout_key)  # noqa: E731
    assert GuidedDenoiser(wrapped, weight=3.0, label_dim=3)(x, sigma, labels).flatten().tolist() == [63.0, 33.0]


def test_autoguidance_hand_values_and_refusals() -> None:
    main, weak_uncond, weak_cond = Affine(2.0, 3), Affine(1.0, 0), Affine(1.0, 3)
    x, sigma, labels = torch.ones(1, 1, 1, 1), torch.tensor([0.5]), torch.eye(3)[[1]]
    # f_main = 2 + 0.5 + 10 = 12.5; unconditional weak f = 1.5; 1.5 + 2·(12.5 − 1.5) = 23.5
    assert GuidedDenoiser(main, weight=2.0, guide=weak_uncond)(x, sigma, labels).item() == 23.5
    assert weak_uncond.calls[-1][0] is None  # an unconditional guide gets no labels
    # a conditional weak model gets the same labels: 11.5 + 2·(12.5 − 11.5) = 13.5
    assert GuidedDenoiser(main, weight=2.0, guide=weak_cond)(x, sigma, labels).item() == 13.5
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedDenoiser(Affine(1.0, 0), weight=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        GuidedDenoiser(main, weight=float("nan"))


def test_guided_one_step_sampling_is_the_guided_combination() -> None:
    cfg = replace(RunConfig(), net=replace(SMALL_CONFIGS["tiny-edm2"], label_dim=4, img_resolution=8,
                                           channel_mult=(1, 2), num_blocks=1, attn_resolutions=()))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move EDM2's zero-initialised output gain
    seeds, labels = torch.arange(3), torch.tensor([0, 1, 3])
    plain = sample_images(model, cfg, seeds, class_labels=labels)
    assert torch.equal(sample_images(model, cfg, seeds, class_labels=labels, guidance=1.0), plain)
    guided = sample_images(model, cfg, seeds, class_labels=labels, guidance=2.5)
    uncond = sample_images(model, cfg, seeds, class_labels=torch.zeros(3, 4))  # all-zero label vectors
    torch.testing.assert_close(guided, uncond + 2.5 * (plain - uncond), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, plain)


def test_target_guidance_field_defaults_to_the_paper_and_is_validated() -> None:
    assert ObjectiveConfig().target_guidance == 1.0 and ObjectiveConfig().target_guide == ""
    with pytest.raises(ValueError, match=r"--objective.target-guidance nan: expected a guidance weight"):
        ObjectiveConfig(target_guidance=float("nan"))
    ObjectiveConfig(target_guidance=2.0)  # classifier-free: allowed here, checked against the net at training start
    with pytest.raises(ValueError, match="--objective.target-guide.*would not be used"):
        ObjectiveConfig(target_guide="weak.safetensors")
    # Adding the fields did not change what older runs' training states are tied to.
    assert "target_guidance" not in RunConfig().hyperparameters()["objective"]


def _guided_step(cfg, monkeypatch, guide=None):
    """One training step of `cfg` on random data; returns the Passes its loss was given and the loss sum."""
    from ectune.runtime import distributed as rt_dist
    from ectune.training import step
    from ectune.training.fastpath import FastPath

    from conftest import random_data

    seen = []
    real = step.consistency_loss
    monkeypatch.setattr(step, "consistency_loss", lambda f, *a, **k: seen.append(f) or real(f, *a, **k))
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # away from the initialisation, whose zeroed output layer ignores the labels
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = FastPath(model, cfg, dist=rt_dist.Dist(), device=torch.device("cpu"))
    opt = step.make_optimizer(cfg, list(model.net.parameters()), torch.device("cpu"))
    spec = step.LossSpec()
    result = step.training_step(fast=fast, opt=opt, data=random_data(cfg, 16), cfg=cfg, spec=spec,
                                nimg=int(cfg.train.total_kimg * 1000) - cfg.train.batch, dist=rt_dist.Dist(), guide=guide)
    return seen[0], float(result.loss_sum)


def test_training_step_targets_the_guided_teacher(monkeypatch) -> None:
    """--objective.target-guidance w: the step's target pass is f_g + w·(f − f_g), here f_g = f under the
    unconditional label; w = 1 leaves the paper's target pass untouched."""
    from conftest import with_fields

    cfg = with_fields(_conditional_cfg(), batch=8, total_kimg=0.064)
    plain, loss_plain = _guided_step(cfg, monkeypatch)
    assert not isinstance(plain.target, GuidedDenoiser)
    guided_cfg = replace(cfg, objective=replace(cfg.objective, target_guidance=3.0))
    monkeypatch.undo()
    guided, loss_guided = _guided_step(guided_cfg, monkeypatch)
    assert isinstance(guided.target, GuidedDenoiser) and guided.target.weight == 3.0 and guided.target.guide is None
    assert guided.target.model is guided.student  # the same f: classifier-free guidance with the model itself
    assert loss_guided != loss_plain


def test_guided_target_refusals(tmp_path) -> None:
    from ectune.presets import get_preset
    from ectune.runtime.checkpoint import save_model
    from ectune.training.step import load_target_guide

    cfg = get_preset("fashion-mnist", "tune")
    unconditional = replace(cfg, net=replace(cfg.net, label_dim=0), objective=replace(cfg.objective, target_guidance=2.0))
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        load_target_guide(unconditional, build_model(unconditional), torch.device("cpu"))
    other = replace(cfg, net=replace(SMALL_CONFIGS["tiny"], img_resolution=16))
    path = tmp_path / "guide.safetensors"
    save_model(path, build_model(other).net.state_dict(), other)
    autoguided = replace(cfg, objective=replace(cfg.objective, target_guidance=2.0, target_guide=str(path)))
    with pytest.raises(ValueError, match="the guide model works on"):
        load_target_guide(autoguided, build_model(autoguided), torch.device("cpu"))


def _conditional_cfg() -> RunConfig:
    from ectune.presets import get_preset

    cfg = get_preset("fashion-mnist", "tune")
    net = replace(SMALL_CONFIGS["tiny"], model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                  label_dim=4)
    return replace(cfg, net=net)
