"""`ectune import-edm FILE.pkl --out MODEL.safetensors [--kind edm|edm2] [--preset NAME]`.

Turns a public EDM (DDPM++) or EDM2 network pickle into an ectune model file that `ectune tune --init`,
`ectune sample` and `ectune info` accept. The pickle is read with ectune's restricted unpickler (see
ectune.importers.edm_pickle): the source code it embeds is never compiled or run, and any global outside a short
whitelist is refused before it is called. Every key and shape is checked against the network inferred from the
tensors; the model file holds that network config plus the rest of a preset's RunConfig.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, Sequence

import tyro

from ..config import NetConfig, RunConfig
from ..presets import get_preset, preset_names
from .common import optional, parse

# EDM2's ImageNet-64 sizes (REFERENCE §7) by model_channels; its ImageNet-512 sizes (4-channel latents) likewise.
_EDM2_PRESETS = {192: "imagenet64-s", 256: "imagenet64-m", 320: "imagenet64-l", 384: "imagenet64-xl"}
_EDM2_512_PRESETS = {64: "imagenet512-xxs", 128: "imagenet512-xs", 192: "imagenet512-s", 256: "imagenet512-m",
                     320: "imagenet512-l", 384: "imagenet512-xl", 448: "imagenet512-xxl"}
LICENCE_NOTE = ("note: NVIDIA's public EDM/EDM2 checkpoints are licensed CC BY-NC-SA 4.0 (non-commercial, share-alike); "
                "models tuned from them inherit those terms")
# The preset names as choices, so that tyro lists them and refuses others; built from the registry at import time.
PresetName = Literal[tuple(preset_names())]  # type: ignore[valid-type]


@dataclass(frozen=True, kw_only=True)
class ImportEdmArgs:
    """convert an EDM/EDM2 network pickle (without running its code) to an ectune model"""

    pickle: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="PICKLE")]
    """network-snapshot-*.pkl (EDM, ECT) or edm2-*.pkl (EDM2)"""
    out: Annotated[Path, tyro.conf.arg(metavar="MODEL.safetensors")]
    """MODEL.safetensors to write"""
    kind: Annotated[Literal["edm", "edm2"] | None,
                    optional("{edm,edm2}", unset="guessed from the network's layout")] = None
    """which network family the pickle holds"""
    preset: Annotated[PresetName | None, optional(  # type: ignore[valid-type]
        "{" + ",".join(preset_names()) + "}", unset="cifar10 for DDPM++ 32×32, imagenet64-*/imagenet512-* for EDM2")] = None
    """recipe stored with the model"""
    sigma_min_shift: Annotated[float | None, optional("S", unset="the preset's")] = None
    """store this boundary f(x, σ_min) = x for consistency sampling (0.003: the public ECT checkpoints)"""


def default_preset(net: NetConfig, path: Path) -> str:
    """The preset whose recipe matches an imported network: cifar10 for DDPM++ 32×32, imagenet64-{s,m,l,xl} for EDM2."""
    if net.arch == "ddpmpp" and net.img_resolution == 32:
        return "cifar10"
    if net.arch == "edm2" and net.img_channels == 4 and net.model_channels in _EDM2_512_PRESETS:
        return _EDM2_512_PRESETS[net.model_channels]
    if net.arch == "edm2" and net.img_channels == 3 and net.model_channels in _EDM2_PRESETS:
        return _EDM2_PRESETS[net.model_channels]
    raise ValueError(
        f"{path}: no preset matches the imported {net.arch} network ({net.img_resolution}×{net.img_resolution}, "
        f"model_channels {net.model_channels}); choose one with --preset"
    )


def imported_config(net: NetConfig, preset: str, *, sigma_data: float, sigma_min_shift: float | None = None) -> RunConfig:
    """The RunConfig stored with an imported network: the preset's `tune` recipe around the pickle's network, with
    `sigma_min_shift` (if given) as its sampling boundary."""
    cfg = get_preset(preset, "tune")
    sample = cfg.sample if sigma_min_shift is None else replace(cfg.sample, sigma_min_shift=sigma_min_shift)
    return replace(cfg, net=net, precond=replace(cfg.precond, sigma_data=sigma_data),
                   data=replace(cfg.data, use_labels=net.label_dim > 0), sample=sample)


def run(command: str, argv: Sequence[str]) -> int:
    a = parse(ImportEdmArgs, command, argv)
    from ..importers.edm_pickle import PickleRefused, map_to_ectune, read_edm_pickle
    from ..model import load_model, sampling_boundary
    from ..nets import count_params
    from ..runtime.checkpoint import save_model

    if not a.pickle.is_file():
        raise FileNotFoundError(f"{a.pickle}: no such file (expected an EDM/EDM2 network pickle)")
    if a.out.suffix != ".safetensors":
        raise ValueError(f"--out {a.out}: the model file name must end in .safetensors")
    if a.out.resolve() == a.pickle.resolve():
        raise ValueError(f"--out {a.out} is the input pickle; choose another file name")
    try:
        pkl = read_edm_pickle(a.pickle)
    except PickleRefused as exc:
        raise ValueError(f"refused {exc}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, KeyError) as exc:
        raise ValueError(f"{a.pickle} is not a readable EDM/EDM2 network pickle "
                         f"({type(exc).__name__}: {str(exc)[:200]}); it may be truncated") from None

    kind = a.kind or _guess_kind(pkl.state, a.pickle)
    try:
        net, state = map_to_ectune(pkl.state, kind, init_kwargs=pkl.init_kwargs)
    except ValueError as exc:
        raise ValueError(f"{a.pickle} (--kind {kind}): {exc}") from None
    preset = a.preset or default_preset(net, a.pickle)
    sigma_data = float(pkl.init_kwargs.get("sigma_data", 0.5))
    cfg = imported_config(net, preset, sigma_data=sigma_data, sigma_min_shift=a.sigma_min_shift)
    cfg, latent_note = with_encoder(cfg, pkl.encoder, a.pickle)
    sampling_boundary(cfg)  # a bad --sigma-min-shift stops here, before anything is written
    extra = {"nimg": 0, "objective": "diffusion", "imported_from": a.pickle.name, "kind": kind,
             "class_name": pkl.class_name, "preset": preset}
    save_model(a.out, state, cfg, extra=extra)
    model, _, _ = load_model(a.out)  # proves the file loads strictly, as `ectune tune --init` will load it
    print(f"imported {kind} {pkl.class_name} from {a.pickle}: {net.arch} {count_params(model.net) / 1e6:.1f}M parameters, "
          f"{len(state)} tensors checked, recipe {preset!r} -> {a.out}")
    if latent_note:
        print(latent_note)
    print(LICENCE_NOTE)
    return 0


def with_encoder(cfg: RunConfig, encoder: dict | None, path: Path) -> tuple[RunConfig, str]:
    """cfg with the latent description of an EDM2 pickle's encoder (a VAE encoder: the model is latent; EDM2's RGB
    encoder: pixels), and a note saying what was recorded."""
    from ..latents.norm import DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD

    if encoder is None or "VAE" not in str(encoder.get("class_name")):
        if cfg.net.img_channels == 4 and cfg.data.vae:
            return cfg, (f"note: {path} names no VAE encoder; recorded the preset's VAE {cfg.data.vae} "
                         "(override with --data.vae when tuning)")
        return replace(cfg, data=replace(cfg.data, vae="", latent_mean=(), latent_std=())) if cfg.data.vae else cfg, ""
    vae = encoder.get("vae_name") or DEFAULT_VAE
    mean = tuple(encoder.get("raw_mean") or EDM2_RAW_MEAN)
    std = tuple(encoder.get("raw_std") or EDM2_RAW_STD)
    if len(mean) != cfg.net.img_channels or len(std) != cfg.net.img_channels:
        raise ValueError(f"{path}: the encoder's latent mean/std have {len(mean)}/{len(std)} channels but the network "
                         f"takes {cfg.net.img_channels}")
    data = replace(cfg.data, source="latents", vae=vae, latent_mean=mean, latent_std=std)
    given = "recorded" if encoder.get("raw_mean") else "EDM2's published values (the pickle records none)"
    return replace(cfg, data=data), (f"latent model: decodes with VAE {vae}; latent mean/std per channel: {given} "
                                     f"{list(mean)} / {list(std)}")


def _guess_kind(state: dict, path: Path) -> str:
    if any(k.startswith("unet.") for k in state):
        return "edm2"
    if any(k.startswith("model.") for k in state):
        return "edm"
    raise ValueError(f"{path}: cannot tell EDM from EDM2 (the network has neither .model nor .unet); pass --kind")
