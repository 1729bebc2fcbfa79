"""Evaluation: `ectune eval` / `ectune ref-stats`, the mid-t search, the training hook and the scaling-law fit.

Fast on a CPU: a tiny random DDPM++ on a 48-image IDX dataset (real Fashion-MNIST images), a handful of samples.
Most tests swap the EfficientNet-Lite0 extractor for a cheap pixel-pooling one (the evaluation logic is what is
under test); one end-to-end test uses the real Lite0 extractor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ectune import analysis, evaluation
from ectune.cli import main
from ectune.config import DataConfig, ObjectiveConfig
from ectune.data import read_idx, write_idx
from ectune.metrics import FeatureExtractor, stats_of_images
from ectune.model import build_model
from ectune.nets import SMALL_CONFIGS
from ectune.presets import get_preset
from ectune.runtime.checkpoint import load_model_weights, read_model_meta, save_model

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


class PoolExtractor(FeatureExtractor):
    """A cheap deterministic stand-in for Lite0: 4×4 average-pooled pixels (16-d features)."""

    def __init__(self, *, device="cpu", weights=None) -> None:
        super().__init__(name="lite0", report_name="FD-Lite0", dim=16, device=device)
        self._finish_init()

    def _features(self, x):
        return F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 4).flatten(1) / 255.0


@pytest.fixture
def fake_extractor(monkeypatch):
    monkeypatch.setattr(evaluation, "_EXTRACTOR_CACHE", {})
    monkeypatch.setattr(evaluation, "get_extractor", lambda name, device="cpu", weights=None: PoolExtractor(device=device))


@pytest.fixture
def tiny_model(tmp_path, monkeypatch) -> Path:
    """A random tiny ECT model whose training data is a 48-image IDX copy of Fashion-MNIST test images."""
    monkeypatch.setenv("ECTUNE_CACHE", str(tmp_path / "cache"))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    images = read_idx(FMNIST)[:48] if FMNIST.exists() else np.random.default_rng(0).integers(0, 256, (48, 28, 28), dtype=np.uint8)
    write_idx(data_dir / "train-images-idx3-ubyte", images)
    net = dataclasses.replace(SMALL_CONFIGS["tiny"], model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=())
    cfg = get_preset("fashion-mnist", "tune")
    cfg = dataclasses.replace(cfg, net=net, data=DataConfig(source="idx", path=str(data_dir), resolution=32))
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path / "run" / "model.safetensors"
    save_model(path, model.net.state_dict(), cfg, extra={"nimg": 1234, "objective": "ect"})
    return path


def _eval(args: list[str], capsys) -> dict:
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.rindex("}") + 1])


# ---------------------------------------------------------------------------------------------- CLI
def test_eval_cli_real_lite0_writes_json(tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "_EXTRACTOR_CACHE", {})
    res = _eval([str(tiny_model.parent), "--n", "6", "--steps", "1,2", "--batch", "6", "--device", "cpu", "--ref-max", "12"], capsys)
    path = tiny_model.parent / "eval-lite0.json"
    assert json.loads(path.read_text()) == res
    assert res["metric_name"] == "FD-Lite0" and res["extractor"] == "lite0"
    assert res["n"] == 6 and res["seeds"] == [0, 5] and res["steps"] == [1, 2] and res["mid_t"] == [0.821]
    assert res["nimg"] == 1234 and res["kimg"] == pytest.approx(1.234) and res["device"] == "cpu"
    assert [r["label"] for r in res["results"]] == ["1step", "2step"] and [r["nfe"] for r in res["results"]] == [1, 2]
    assert all(math.isfinite(v) and v > 0 for v in res["fd"].values())
    assert res["reference"]["count"] == 12 and Path(res["reference"]["cache"]).is_file()
    assert "torch" in res["hardware"] and res["wall_seconds"] > 0


def test_seeds_and_steps_determine_the_result(tiny_model, capsys, fake_extractor, tmp_path):
    common = [str(tiny_model), "--n", "10", "--device", "cpu"]
    a = _eval([*common, "--steps", "1,2", "--batch", "10", "--out", str(tmp_path / "a.json")], capsys)
    b = _eval([*common, "--steps", "2,1", "--batch", "3", "--out", str(tmp_path / "b.json")], capsys)
    c = _eval([*common, "--steps", "1", "--seed", "100", "--out", str(tmp_path / "c.json")], capsys)
    assert a["fd"] == b["fd"]  # batch size and order of settings do not matter
    assert c["fd"]["1step"] != a["fd"]["1step"] and c["seeds"] == [100, 109]
    assert a["fd"]["1step"] != a["fd"]["2step"]


def test_pr_and_heun_fields(tiny_model, capsys, fake_extractor, tmp_path):
    res = _eval([str(tiny_model), "--n", "8", "--steps", "1", "--heun", "--pr", "--pr-n", "8", "--device", "cpu",
                 "--out", str(tmp_path / "r.json")], capsys)
    heun = res["results"][-1]
    assert heun["method"] == "heun" and heun["nfe"] == 2 * 18 - 1
    for row in res["results"]:
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0 and row["pr_n"] == 8


def test_search_mid_t_rewrites_model_and_sample_uses_it(tiny_model, capsys, fake_extractor, tmp_path, monkeypatch):
    before = load_model_weights(tiny_model)
    res = _eval([str(tiny_model), "--n", "6", "--steps", "2", "--search-mid-t", "--search-n", "6", "--search-iters", "2",
                 "--device", "cpu"], capsys)
    search = res["mid_t_search"]
    best = search["best_mid_t"]
    assert len(search["history"]) == 4 and search["seeds"][0] >= evaluation.HELDOUT_SEED_OFFSET
    assert best == min(search["history"], key=lambda h: h["fd"])["mid_t"] and 0.1 <= best <= 10.0
    assert res["mid_t"] == [best] and res["results"][0]["mid_t"] == [best]
    cfg, extra = read_model_meta(tiny_model)
    assert cfg.sample.mid_t == (best,) and extra["mid_t_search"]["best_mid_t"] == best and extra["nimg"] == 1234
    after = load_model_weights(tiny_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # `ectune sample` now defaults to the found time: same images as passing it explicitly, not as the old 0.821.
    outs = {}
    for name, extra_args in {"default": [], "explicit": ["--mid-t", str(best)], "old": ["--mid-t", "0.821"]}.items():
        out = tmp_path / f"{name}.npz"
        assert main(["sample", str(tiny_model), "--steps", "2", "--n", "4", "--device", "cpu", "--out", str(out), *extra_args]) == 0
        outs[name] = np.load(out)["arr_0"]
    assert np.array_equal(outs["default"], outs["explicit"])
    assert not np.array_equal(outs["default"], outs["old"])


def test_eval_sigma_min_shift_flag_equals_the_stored_boundary(tiny_model, capsys, fake_extractor, tmp_path):
    """`ectune eval --sigma-min-shift S` evaluates with the sampling boundary S, the same as a model file storing S;
    the result names the boundary used."""
    common = ["--n", "6", "--steps", "1,2", "--device", "cpu"]
    plain = _eval([str(tiny_model), *common, "--out", str(tmp_path / "a.json")], capsys)
    flag = _eval([str(tiny_model), *common, "--sigma-min-shift", "0.5", "--out", str(tmp_path / "b.json")], capsys)
    cfg, extra = read_model_meta(tiny_model)
    stored = tmp_path / "stored.safetensors"
    save_model(stored, load_model_weights(tiny_model), dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sigma_min_shift=0.5)), extra=extra)
    kept = _eval([str(stored), *common, "--out", str(tmp_path / "c.json")], capsys)
    assert plain["sigma_min_shift"] == 0.0 and flag["sigma_min_shift"] == kept["sigma_min_shift"] == 0.5
    assert flag["fd"] == kept["fd"] and flag["fd"]["2step"] != plain["fd"]["2step"]


def test_ref_stats_cli_prints_cache_path(tiny_model, capsys, fake_extractor, tmp_path):
    data_dir = tiny_model.parent.parent / "data"
    assert main(["ref-stats", "--data.source", "idx", "--data.path", str(data_dir), "--data.resolution", "32",
                 "--cache-dir", str(tmp_path / "rc"), "--device", "cpu"]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.is_file() and path.parent == tmp_path / "rc" and "__train__lite0__32px__" in path.name


@pytest.mark.parametrize("args, message", [
    (["eval", "/nonexistent/model.safetensors"], "no ectune model at"),
    (["eval", "MODEL", "--metric", "fid"], "unknown metric 'fid'"),
    (["eval", "MODEL", "--steps", "one"], "--steps 'one'"),
    (["eval", "MODEL", "--n", "1"], "--n 1"),
    (["eval", "MODEL", "--search-mid-t", "--mid-t", "1.0"], "conflict"),
    (["ref-stats", "--metric", "nope"], "unknown metric 'nope'"),
    (["ref-stats", "--net.model-channels", "8"], "only --data.FIELD"),
])
def test_clear_errors(tiny_model, capsys, args, message):
    args = [str(tiny_model) if a == "MODEL" else a for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- library
def test_golden_section_finds_analytic_minimum():
    # f has its minimum at x* = 1.7 on a log scale; 30 iterations shrink the bracket by 0.618^30 ≈ 5e-7.
    best, hist = analysis.golden_section_search(lambda x: (math.log(x) - math.log(1.7)) ** 2, 0.05, 20.0, iters=30)
    assert best == pytest.approx(1.7, rel=1e-5) and len(hist) == 32
    best, _ = analysis.golden_section_search(lambda x: (x - 3.0) ** 2 + 1, -5.0, 5.0, iters=40, log=False)
    assert best == pytest.approx(3.0, abs=1e-6)
    best, _ = analysis.golden_section_search(lambda x: x, 0.5, 8.0, iters=30)  # monotone: converges to the edge
    assert best == pytest.approx(0.5, rel=1e-4)
    with pytest.raises(ValueError, match="lo < hi"):
        analysis.golden_section_search(lambda x: x, 0.0, 1.0)


def test_evaluate_in_training_record(tiny_model, fake_extractor):
    from ectune.model import load_model

    model, cfg, _ = load_model(tiny_model)
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, eval_n=8))
    data = evaluation.open_reference_data(cfg)
    model.train()
    rec = evaluation.evaluate_in_training(model, cfg, data, nimg=2500, device="cpu")
    assert model.training  # the caller's mode is restored
    assert rec["kimg"] == 2.5 and rec["metric_name"] == "FD-Lite0" and rec["metric_value"] == rec["fd_1step"]
    assert rec["eval_n"] == 8 and "fd_2step" in rec
    json.dumps(rec)
    diff_cfg = dataclasses.replace(cfg, objective=ObjectiveConfig(kind="diffusion"),
                                   sample=dataclasses.replace(cfg.sample, heun_steps=2))
    rec = evaluation.evaluate_in_training(model, diff_cfg, data, nimg=1000, device="cpu")
    assert rec["metric_sampler"] == "heun" and rec["metric_value"] == rec["fd_heun"]


def test_distributed_split_matches_one_process(tiny_model, fake_extractor, monkeypatch):
    """Two simulated ranks (contiguous seed shares, statistics summed) give the one-process FD and PR features."""
    from ectune.model import load_model
    from ectune.metrics import fd_from_stats

    model, cfg, _ = load_model(tiny_model)
    ext = evaluation.load_extractor("lite0")
    seeds = torch.arange(7)
    full, feats = evaluation._generator_stats(model, cfg, seeds, extractor=ext, steps=1, mid_t=None, method="consistency",
                                              device="cpu", batch=4, keep_features=5)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(evaluation.rt_dist, "rank_and_world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(evaluation.FeatureStats, "all_reduce_", lambda self: self)
        stats, _ = evaluation._generator_stats(model, cfg, seeds, extractor=ext, steps=1, mid_t=None, method="consistency",
                                               device="cpu", batch=4)
        parts.append(stats)
    merged = parts[0].merge(parts[1])
    assert merged.count == 7 and np.allclose(merged.sum, full.sum) and np.allclose(merged.sum_outer, full.sum_outer)
    ref = ext(torch.randint(0, 256, (9, 1, 32, 32), dtype=torch.uint8))
    ref_stats = evaluation.FeatureStats(16).update(ref)
    assert fd_from_stats(merged, ref_stats) == pytest.approx(fd_from_stats(full, ref_stats), rel=1e-9)
    assert feats.shape == (5, 16)


def test_fit_power_law_recovers_synthetic_law():
    budgets = np.array([100.0, 200.0, 400.0, 800.0, 1600.0])
    fds = 500.0 * budgets**-0.6
    fit = analysis.fit_power_law(budgets, fds)
    assert fit.K == pytest.approx(500.0, rel=1e-9) and fit.alpha == pytest.approx(-0.6, abs=1e-12)
    assert fit.r == pytest.approx(-1.0, abs=1e-12) and fit.p_value < 1e-6 and fit.n_points == 5
    rng = np.random.default_rng(0)
    noisy = fds * np.exp(rng.normal(0, 0.05, size=fds.shape))
    fit = analysis.fit_power_law(budgets, noisy)
    assert fit.alpha == pytest.approx(-0.6, abs=0.1) and fit.r < -0.95
    assert fit.predict(400.0) == pytest.approx(fit.K * 400.0**fit.alpha)
    with pytest.raises(ValueError, match="at least 3"):
        analysis.fit_power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        analysis.fit_power_law([1.0, 2.0, 3.0], [1.0, -2.0, 3.0])


def test_reference_cache_follows_the_images_not_the_path(tmp_path):
    """Replacing every image behind the same description gives new statistics, not the cached ones."""
    from ectune.data import ImageDataset

    ext = PoolExtractor()
    rng = np.random.default_rng(0)
    data = [ImageDataset(images=torch.from_numpy(rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)),
                         labels=None, num_classes=0, description="same/path") for _ in range(2)]
    first = evaluation.reference_for_data(data[0], "train", ext, cache_dir=tmp_path)
    again = evaluation.reference_for_data(data[0], "train", ext, cache_dir=tmp_path)
    replaced = evaluation.reference_for_data(data[1], "train", ext, cache_dir=tmp_path)
    assert again.key == first.key and np.array_equal(again.sum, first.sum)
    assert replaced.key != first.key and not np.allclose(replaced.sum, first.sum)
    direct = stats_of_images(data[1].images, ext)
    np.testing.assert_allclose(replaced.sum, direct.sum)  # computed from the new images


@pytest.mark.parametrize("damage", ["garbage", "one-image", "nan"])
def test_bad_reference_cache_gives_one_error_naming_it(tmp_path, damage):
    from ectune.data import ImageDataset

    ext = PoolExtractor()
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (20, 1, 8, 8), dtype=np.uint8))
    data = ImageDataset(images=images, labels=None, num_classes=0, description="d")
    stats = evaluation.reference_for_data(data, "train", ext, cache_dir=tmp_path)
    path = evaluation.reference_cache_path(stats, tmp_path)
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        stats.count = 1 if damage == "one-image" else stats.count
        stats.sum[0] = np.nan if damage == "nan" else stats.sum[0]
        stats.save(path)
    with pytest.raises(ValueError, match=rf"cached statistics {re.escape(str(path))} are (unreadable|invalid)"):
        evaluation.reference_for_data(data, "train", ext, cache_dir=tmp_path)
