"""Presets: the recipes' derived numbers against the paper (Tab. 7) and the reference run's schedule, by hand."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ectune.objectives import stage_nimg
from ectune.presets import PRESETS, get_preset
from ectune.schedules import ect_r, ect_stage


def _r(cfg, t: float, nimg: int) -> float:
    """r(t) of a tune preset after `nimg` images (stage a from the preset's d, then Eq. 15/18)."""
    obj = cfg.objective
    a = ect_stage(nimg, stage_nimg(obj, cfg.train.total_kimg * 1000), from_scratch=obj.from_scratch)
    return ect_r(torch.tensor([t], dtype=torch.float64), a, q=obj.q, k=obj.k, b=obj.b, mapping=obj.mapping).item()


def test_cifar10_follows_the_paper_table():
    """Tab. 7, CIFAR-10: 12.8M images = 100k steps × batch 128, RAdam 1e-4, EMA 0.9999, dropout 0.2, q = 2,
    d = total/8 (App. B), w̄ = 1/(t − r), c = 0, P = (−1.1, 2.0); 2-step mid-t 0.821."""
    cfg = get_preset("cifar10", "tune")
    total = cfg.train.total_kimg * 1000
    assert total == 12_800_000 and cfg.train.batch == 128 and total / cfg.train.batch == 100_000
    assert stage_nimg(cfg.objective, total) == 1_600_000
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas) == ("radam", 1e-4, (0.9, 0.999))
    assert (cfg.ema.kind, cfg.ema.beta, cfg.net.dropout) == ("fixed", 0.9999, 0.2)
    o = cfg.objective
    assert (o.q, o.weighting, o.p, o.c, o.P_mean, o.P_std) == (2.0, "inv_dt", 0.5, 0.0, -1.1, 2.0)
    assert cfg.sample.mid_t == (0.821,)


def test_cifar10_400k_is_the_reference_run_schedule():
    """run_ecm.sh: 25.6M images, batch 128, stages of 25k steps = 3.2M images, hence 8 stages; the rest as cifar10."""
    cfg = get_preset("cifar10-400k", "tune")
    total = cfg.train.total_kimg * 1000
    d = stage_nimg(cfg.objective, total)
    assert total == 25_600_000 and cfg.train.batch == 128
    assert d == 3_200_000 and d / cfg.train.batch == 25_000 and total / d == 8
    assert ect_stage(total - cfg.train.batch, d) == 8  # the last step is in stage 8 (a = ⌊nimg/d⌋ + 1)
    # r(t) at known progress against REFERENCE §3's hand values (k = 8, b = 1, q = 2):
    assert _r(cfg, 80.0, 0) == pytest.approx(40.0, abs=1e-4)  # a = 1
    assert _r(cfg, 1.0, 0) == 0.0  # a = 1: clamped
    assert _r(cfg, 1.0, 8_000_000) == pytest.approx(0.606059, abs=1e-6)  # ⌊8.0M / 3.2M⌋ + 1 = 3
    assert _r(cfg, 0.5, 25_600_000 - 128) == pytest.approx(0.492148, abs=1e-6)  # a = 8
    base = get_preset("cifar10", "tune")
    assert replace(cfg, objective=base.objective, train=base.train) == base  # only the schedule differs
    assert get_preset("cifar10-400k", "pretrain") == get_preset("cifar10", "pretrain")
    # The stage length is fixed in images: a longer run adds stages instead of stretching them.
    longer = replace(cfg, train=replace(cfg.train, total_kimg=51_200.0))
    assert stage_nimg(longer.objective, longer.train.total_kimg * 1000) == 3_200_000


def test_every_preset_is_listed_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("\n## Presets\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)`", table, flags=re.M))
    # A row may name sizes of one family: `imagenet64-s/m/l/xl`.
    expanded = {f"{name.rsplit('-', 1)[0]}-{size}" if "/" in name else name
                for name in listed for size in name.rsplit("-", 1)[-1].split("/")}
    assert set(PRESETS) <= expanded, set(PRESETS) - expanded


def test_imagenet512_presets_have_edm2s_parameter_counts():
    """EDM2's ImageNet-512 networks (its Table 2: XS 125M, S 280M, M 498M, L 778M, XL 1119M, XXL 1523M) on 4×64×64
    latents, recording the VAE and normalisation that sampling decodes with."""
    import torch

    from ectune.latents import DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD
    from ectune.nets import build_net, count_params

    published = {"xs": 125, "s": 280, "m": 498, "l": 778, "xl": 1119, "xxl": 1523}
    for size, millions in published.items():
        cfg = get_preset(f"imagenet512-{size}", "tune")
        with torch.device("meta"):
            assert abs(count_params(build_net(cfg.net)) / 1e6 - millions) < 1, size  # the table rounds to 1M
        assert (cfg.net.img_channels, cfg.net.img_resolution, cfg.net.label_dim) == (4, 64, 1000)
        assert (cfg.data.source, cfg.data.vae, cfg.data.latent_mean, cfg.data.latent_std) == (
            "latents", DEFAULT_VAE, EDM2_RAW_MEAN, EDM2_RAW_STD)
        pre = get_preset(f"imagenet512-{size}", "pretrain")
        assert pre.net.dropout == (0.0 if size in ("xs", "s") else 0.1)  # EDM2's own dropout for diffusion
        assert (pre.objective.P_mean, pre.objective.P_std) == (-0.4, 1.0)
