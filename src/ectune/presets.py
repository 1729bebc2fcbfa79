"""Named recipes: complete RunConfigs with the paper's settings (REFERENCE §3, Tab. 7).

A preset gives one config per command: `pretrain` (diffusion, r = 0) and `tune` (ECT, or iCT with the
objective switched). CLI flags then override single fields.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Literal

from .config import (
    DataConfig, EMAConfig, ObjectiveConfig, OptimConfig, RunConfig, RuntimeConfig, SampleConfig, TrainConfig,
)
from .nets import PAPER_CONFIGS, SMALL_CONFIGS
from .objectives import ict_objective

Mode = Literal["pretrain", "tune"]

# "ECT pretraining" (App. B): adaptive weighting p = 1/2, c = 0 and w̄ = 1/t, EDM's t ~ LogNormal(−1.2, 1.2).
PRETRAIN_OBJECTIVE = ObjectiveConfig(kind="diffusion", P_mean=-1.2, P_std=1.2, weighting="inv_t", p=0.5, c=0.0)


def _fashion_mnist(mode: Mode) -> RunConfig:
    # The CPU demo: class-conditional at the native 28×28, batch 32. On a 2-core CPU's budget of minutes (about
    # 16k + 8k images on a machine 3× slower than a quiet 2-core EPYC), labels, batch 32 instead of 64 (twice the
    # steps) and learning rates of 2e-3 / 4e-4 instead of 1e-3 / 2e-4 each gave clearer 1- and 2-step samples
    # (docs/performance.md).
    net = replace(SMALL_CONFIGS["small"], label_dim=10, dropout=0.1 if mode == "tune" else 0.0)
    data = DataConfig(source="fashion-mnist", use_labels=True)
    sample = SampleConfig(mid_t=(0.821,))
    if mode == "pretrain":
        return RunConfig(
            net=net, data=data, sample=sample, objective=PRETRAIN_OBJECTIVE,
            optim=OptimConfig(name="radam", lr=2e-3, betas=(0.9, 0.99)),
            ema=EMAConfig(kind="halflife", halflife_kimg=10.0),
            train=TrainConfig(total_kimg=48.0, batch=32),
            runtime=RuntimeConfig(status_kimg=4.0, save_kimg=8.0, sample_kimg=48.0),
        )
    return RunConfig(
        net=net, data=data, sample=sample,
        # A short tune: two stages with q = 4 bring r/t from ~0 to ~0.75 at the median t.
        objective=ObjectiveConfig(kind="ect", P_mean=-1.1, P_std=2.0, q=4.0, stages=2, weighting="inv_dt", p=0.5, c=0.0),
        optim=OptimConfig(name="radam", lr=4e-4, betas=(0.9, 0.99)),
        ema=EMAConfig(kind="halflife", halflife_kimg=5.0),
        train=TrainConfig(total_kimg=24.0, batch=32),
        runtime=RuntimeConfig(status_kimg=4.0, save_kimg=8.0, sample_kimg=24.0),
    )


def _cifar10(mode: Mode) -> RunConfig:
    net = replace(PAPER_CONFIGS["cifar10-ddpmpp"], dropout=0.2 if mode == "tune" else 0.13)
    data = DataConfig(source="edm", path="", resolution=0, xflip=False)
    if mode == "pretrain":  # EDM's DDPM++ CIFAR-10 recipe with ECT's pretraining weighting
        return RunConfig(
            net=net, data=data, objective=PRETRAIN_OBJECTIVE,
            optim=OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), warmup_kimg=10_000.0),
            ema=EMAConfig(kind="halflife", halflife_kimg=500.0),
            train=TrainConfig(total_kimg=200_000.0, batch=512),
            runtime=RuntimeConfig(save_kimg=2_500.0, sample_kimg=10_000.0, status_kimg=50.0),
        )
    return RunConfig(
        net=net, data=data,
        objective=ObjectiveConfig(kind="ect", P_mean=-1.1, P_std=2.0, q=2.0, stages=8, weighting="inv_dt", p=0.5, c=0.0),
        optim=OptimConfig(name="radam", lr=1e-4, betas=(0.9, 0.999)),
        ema=EMAConfig(kind="fixed", beta=0.9999),
        sample=SampleConfig(mid_t=(0.821,)),
        train=TrainConfig(total_kimg=12_800.0, batch=128),
        runtime=RuntimeConfig(save_kimg=500.0, sample_kimg=1_000.0, status_kimg=50.0),
    )


def _cifar10_1hour(mode: Mode) -> RunConfig:
    cfg = _cifar10(mode)
    if mode == "pretrain":
        return cfg
    return replace(
        cfg,
        objective=replace(cfg.objective, q=256.0, stages=1),  # r/t ≈ 0.99 from the start, one stage
        ema=EMAConfig(kind="fixed", beta=0.9993),
        train=replace(cfg.train, total_kimg=1_024.0),
        runtime=replace(cfg.runtime, save_kimg=128.0, sample_kimg=256.0, status_kimg=16.0),
    )


def _cifar10_400k(mode: Mode) -> RunConfig:
    """The reference code's run_ecm.sh schedule: 25.6M images at batch 128 with the stage length fixed at 3.2M images
    (25k steps), so 8 stages. Fixed in images rather than as total/8, so a longer --train.total-kimg adds stages."""
    cfg = _cifar10(mode)
    if mode == "pretrain":
        return cfg
    return replace(cfg, objective=replace(cfg.objective, stage_kimg=3_200.0),
                   train=replace(cfg.train, total_kimg=25_600.0))


def _imagenet64(size: str) -> Callable[[Mode], RunConfig]:
    alpha_ref = {"s": 1.0e-3, "m": 9e-4, "l": 8e-4, "xl": 7e-4}[size]

    def build(mode: Mode) -> RunConfig:
        net = PAPER_CONFIGS[f"img64-{size}"]
        data = DataConfig(source="edm", path="", use_labels=True)
        optim = OptimConfig(name="adam", lr=alpha_ref, betas=(0.9, 0.99), schedule="invsqrt", t_ref_kimg=2000 * 128 / 1000)
        ema = EMAConfig(kind="power", sigma_rels=(0.05, 0.01, 0.10))
        sample = SampleConfig(mid_t=(1.526,))
        cfg = RunConfig(
            net=net, data=data, optim=optim, ema=ema, sample=sample,
            objective=ObjectiveConfig(kind="ect", P_mean=-0.8, P_std=1.6, q=4.0, stages=4,
                                      weighting="inv_t2_plus_inv_sigma_data2", p=0.5, c=0.06),
            train=TrainConfig(total_kimg=12_800.0, batch=128),
        runtime=RuntimeConfig(save_kimg=500.0, sample_kimg=1_000.0, status_kimg=50.0),
        )
        if mode == "pretrain":  # the paper tunes from EDM2's checkpoints; this is the same net as a diffusion model
            cfg = replace(cfg, net=replace(net, dropout=0.0), objective=replace(PRETRAIN_OBJECTIVE, P_mean=-0.8, P_std=1.6))
        return cfg

    return build


IMAGENET512_SIZES = ("xxs", "xs", "s", "m", "l", "xl", "xxl")


def _imagenet512(size: str) -> Callable[[Mode], RunConfig]:
    """Latent ECT on ImageNet-512 (docs/latents.md): EDM2's 512 networks on normalised sd-vae-ft-mse latents, with
    the ImageNet-64 ECT recipe carried over the way that recipe relates to EDM2-64: α_ref = EDM2's / 10, EDM2-512's
    noise distribution P = (−0.4, 1.0), dropout 0.4 (up to S) / 0.5 (from M) at ≤ 16×16. The paper gives no latent
    hyperparameters beyond ECM-M and 12.8M images: these are assumptions, untested at scale."""
    alpha_ref = dict(zip(IMAGENET512_SIZES, (1.7e-3, 1.2e-3, 1.0e-3, 9e-4, 8e-4, 7e-4, 6.5e-4)))[size]

    def build(mode: Mode) -> RunConfig:
        from .latents.norm import DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD

        edm2 = PAPER_CONFIGS[f"img512-{size}"]
        data = DataConfig(source="latents", path="", use_labels=True, vae=DEFAULT_VAE, latent_mean=EDM2_RAW_MEAN,
                          latent_std=EDM2_RAW_STD)
        cfg = RunConfig(
            net=replace(edm2, dropout=0.4 if edm2.model_channels <= 192 else 0.5, dropout_res=16), data=data,
            optim=OptimConfig(name="adam", lr=alpha_ref, betas=(0.9, 0.99), schedule="invsqrt", t_ref_kimg=2000 * 128 / 1000),
            ema=EMAConfig(kind="power", sigma_rels=(0.05, 0.01, 0.10)), sample=SampleConfig(mid_t=(1.526,)),
            objective=ObjectiveConfig(kind="ect", P_mean=-0.4, P_std=1.0, q=4.0, stages=4,
                                      weighting="inv_t2_plus_inv_sigma_data2", p=0.5, c=0.06),
            train=TrainConfig(total_kimg=12_800.0, batch=128),
            runtime=RuntimeConfig(save_kimg=500.0, sample_kimg=1_000.0, status_kimg=50.0),
        )
        if mode == "pretrain":  # EDM2-512's diffusion network and noise distribution, ECT's pretraining weighting
            cfg = replace(cfg, net=edm2, objective=replace(PRETRAIN_OBJECTIVE, P_mean=-0.4, P_std=1.0))
        return cfg

    return build


PRESETS: dict[str, Callable[[Mode], RunConfig]] = {
    "fashion-mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar10-1hour": _cifar10_1hour,
    "cifar10-400k": _cifar10_400k,
    **{f"imagenet64-{s}": _imagenet64(s) for s in ("s", "m", "l", "xl")},
    **{f"imagenet512-{s}": _imagenet512(s) for s in IMAGENET512_SIZES},
}


def get_preset(name: str, mode: Mode, *, objective: Literal["ect", "ict"] = "ect") -> RunConfig:
    """The preset's config for a command; objective='ict' swaps in the iCT baseline objective."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg = PRESETS[name](mode)
    if mode == "tune" and objective == "ict":
        cfg = replace(cfg, objective=ict_objective(cfg.objective))
    return cfg


def preset_names() -> list[str]:
    return list(PRESETS)


__all__ = ["PRESETS", "get_preset", "preset_names", "ict_objective"]
