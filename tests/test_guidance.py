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
    with pytest.raises(ValueError, match="does not use a guided target yet"):
        ObjectiveConfig(target_guidance=2.0)
    with pytest.raises(ValueError, match="--objective.target-guide"):
        ObjectiveConfig(target_guide="weak.safetensors")
    # Adding the fields did not change what older runs' training states are tied to.
    assert "target_guidance" not in RunConfig().hyperparameters()["objective"]
