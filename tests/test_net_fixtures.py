"""ectune's networks compute the official DDPM++ / EDM2 functions: outputs of the official implementations on fixed
inputs (../shared/fixtures/nets, produced outside this repository), loaded through the public importer mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ectune.importers import map_to_ectune
from ectune.nets import build_net

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "nets"
CASES = ["ddpmpp-uncond-16", "ddpmpp-cond-aug-16", "ddpmpp-gray-32",
         "edm2-cond-16", "edm2-latent-cond-8", "edm2-narrow-16"]


def load_case(name: str) -> tuple[str, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(kind, official constructor kwargs, official state dict, inputs and `out`) of one fixture file."""
    path = FIXTURES / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"fixture {path} is not present (it lives in the shared folder beside the repository)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    io = {k: v for k, v in tensors.items() if not k.startswith("state.")}
    return meta["kind"], json.loads(meta["config"]), state, io


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def run_case(name: str, net: torch.nn.Module | None = None) -> float:
    """Relative error of ectune's network (built from the fixture, or `net` with the fixture's weights)."""
    kind, config, state, io = load_case(name)
    cfg, sd = map_to_ectune(state, kind, init_kwargs=config)
    net = build_net(cfg) if net is None else net
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        y = net(io["x"], io["noise_labels"], io.get("class_labels"), **(
            {"augment_labels": io["augment_labels"]} if "augment_labels" in io else {}))
    assert y.shape == io["out"].shape and y.dtype == torch.float32
    return relative_error(y, io["out"])


@pytest.mark.parametrize("name", CASES)
def test_matches_official_output(name: str) -> None:
    err = run_case(name)
    print(f"{name}: relative error {err:.2e}")
    assert err <= 1e-5


def test_fixtures_are_informative() -> None:
    """The comparison is not trivially passed: outputs are far from zero and from each other across σ, and the
    conditioning inputs change them."""
    for name in CASES:
        _, _, _, io = load_case(name)
        out = io["out"]
        assert out.abs().mean() > 1e-2, name
        assert relative_error(out[0], out[-1]) > 0.1, name


def test_narrow_edm2_has_no_attention() -> None:
    """EDM2 gives each attention layer channels // 64 heads: 16/32-channel layers have none at all."""
    kind, config, state, _ = load_case("edm2-narrow-16")
    cfg, _ = map_to_ectune(state, kind, init_kwargs=config)
    keys = build_net(cfg).state_dict().keys()
    assert not any("attn" in k for k in keys)
    assert set(keys) == set(state)


def test_augment_and_class_labels_matter() -> None:
    """Dropping the augmentation or class input must break the match (they are really wired in)."""
    kind, config, state, io = load_case("ddpmpp-cond-aug-16")
    cfg, sd = map_to_ectune(state, kind, init_kwargs=config)
    net = build_net(cfg).eval()
    net.load_state_dict(sd)
    with torch.no_grad():
        no_aug = net(io["x"], io["noise_labels"], io["class_labels"])
        no_label = net(io["x"], io["noise_labels"], None, augment_labels=io["augment_labels"])
    assert relative_error(no_aug, io["out"]) > 1e-3
    assert relative_error(no_label, io["out"]) > 1e-3
