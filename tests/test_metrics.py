"""Tests for ectune.metrics: Fréchet distance maths, streaming statistics, extractors, caches, k-NN PR.

Analytic checks first (closed-form FD between Gaussians), then the real-data check: FD-Lite0 between two
halves of the Fashion-MNIST test set must be far below FD-Lite0 between Fashion-MNIST and handwritten digits
(scikit-learn's bundled UCI digits, upscaled to MNIST's 28×28 format and round-tripped through IDX).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from ectune.metrics import (
    ExtractorUnavailableError,
    FeatureExtractor,
    FeatureStats,
    fd_from_stats,
    frechet_distance,
    get_extractor,
    knn_radii,
    prdc,
    precision_recall,
    ref_key,
    reference_stats,
    stats_of_generator,
)
from ectune.metrics.extractors import DINOV2_HUB_REPO_DIRNAME, DINOV2_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_FILENAME

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------- helpers
def _fd_gaussians_commuting(mu1: np.ndarray, d1: np.ndarray, mu2: np.ndarray, d2: np.ndarray) -> float:
    """Closed form for diagonal (commuting) covariances: ||mu1-mu2||² + Σ_i (sqrt(a_i) - sqrt(b_i))²."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum())


def _read_idx_gz(path: Path) -> np.ndarray:
    """Minimal IDX reader (gzip or plain): magic 0x0000 <type> <ndim>, big-endian int32 dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    assert zero == 0 and dtype_code == 0x08, f"{path}: not an unsigned-byte IDX file"
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Minimal IDX writer for uint8 arrays (the MNIST on-disk format)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, a.ndim))
        f.write(struct.pack(">" + "I" * a.ndim, *a.shape))
        f.write(a.tobytes())


class _PoolExtractor(FeatureExtractor):
    """Cheap deterministic stand-in extractor: 4×4 average-pooled grayscale, 16-d."""

    def __init__(self, name: str = "pool4") -> None:
        super().__init__(name=name, report_name="FD-pool4", dim=16, device="cpu")
        self._finish_init()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().mean(1, keepdim=True) / 255.0
        return nn.functional.adaptive_avg_pool2d(g, 4).flatten(1)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return get_extractor("lite0")


# ---------------------------------------------------------------------------------------------- FD maths
def test_frechet_distance_matches_closed_form_for_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    d = 7
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = _fd_gaussians_commuting(mu1, a, mu2, b)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # A common rotation keeps the covariances commuting and the distance unchanged (FD is rotation-invariant).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    # Torch tensors are accepted too.
    got_t = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(a)), torch.tensor(mu2), torch.tensor(np.diag(b)))
    assert got_t == pytest.approx(expected, rel=1e-12)
    # Hand value in 1-D: (0 - 3)² + (sqrt(4) - sqrt(1))² = 9 + 1.
    assert frechet_distance(np.zeros(1), np.eye(1) * 4, np.full(1, 3.0), np.eye(1)) == pytest.approx(10.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances() -> None:
    rng = np.random.default_rng(1)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n, d", [(400, 32), (60, 300)])  # full-rank and rank-deficient (N < D) covariances
def test_fd_is_zero_for_identical_feature_sets(n: int, d: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 5.0, d) + 3.0
    s = FeatureStats(d).update(x)
    assert fd_from_stats(s, s) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_samples_matches_fd_of_true_gaussians() -> None:
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.5])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 0.5, 0.5, 1.0])
    expected = _fd_gaussians_commuting(mu1, v1, mu2, v2)  # = 2.25 + 0.8038...
    a = FeatureStats(d)
    b = FeatureStats(d)
    for _ in range(4):  # streamed in batches, as during evaluation
        a.update(torch.from_numpy(mu1 + np.sqrt(v1) * rng.standard_normal((n // 4, d))))
        b.update(torch.from_numpy(mu2 + np.sqrt(v2) * rng.standard_normal((n // 4, d))))
    got = fd_from_stats(a, b)
    # Sampling error of the plug-in estimate is O(sqrt(D/N)) ≈ 0.005 here; 0.03 leaves > 5σ of room.
    assert got == pytest.approx(expected, abs=0.03), (got, expected)


def test_frechet_distance_rejects_mismatched_shapes_and_non_psd() -> None:
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="negative"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), -np.eye(2))


# ---------------------------------------------------------------------------------------------- FeatureStats
def test_stats_identical_for_one_batch_many_batches_and_merge() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 24)) * 3.0 + 10.0
    one = FeatureStats(24).update(x)
    many = FeatureStats(24)
    for lo, hi in [(0, 1), (1, 17), (17, 500), (500, 999), (999, 1000)]:  # uneven batches, including size 1
        many.update(torch.from_numpy(x[lo:hi]))  # torch input is accepted too
    left, right = FeatureStats(24).update(x[:333]), FeatureStats(24).update(x[333:])
    merged = FeatureStats(24).merge(left).merge(right)
    merged_other_way = FeatureStats(24).update(x[333:]).merge(FeatureStats(24).update(x[:333]))
    for s in (many, merged, merged_other_way):
        assert s.count == one.count == 1000
        np.testing.assert_allclose(s.mean, one.mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(s.cov, one.cov, rtol=0, atol=1e-10)
    # And the moments are the textbook ones.
    np.testing.assert_allclose(one.mean, x.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(one.cov, np.cov(x, rowvar=False), rtol=0, atol=1e-10)


def test_stats_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    s = FeatureStats(10, extractor="lite0", key="fashion-mnist__test__lite0__28px__abcd1234").update(rng.normal(size=(50, 10)))
    path = s.save(tmp_path / "sub" / "stats.npz")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    t = FeatureStats.load(path)
    assert (t.dim, t.count, t.extractor, t.key) == (s.dim, s.count, s.extractor, s.key)
    np.testing.assert_array_equal(t.sum, s.sum)
    np.testing.assert_array_equal(t.sum_outer, s.sum_outer)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only: loadable without pickle
        assert int(z["count"]) == 50 and str(z["extractor"]) == "lite0"


def test_stats_guard_rails() -> None:
    s = FeatureStats(3)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        s.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        s.update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="at least two"):
        FeatureStats(3).update(np.zeros((1, 3))).cov
    with pytest.raises(ValueError, match="extractor"):
        FeatureStats(3, extractor="lite0").merge(FeatureStats(3, extractor="inception"))
    a, b = FeatureStats(3, extractor="lite0"), FeatureStats(3, extractor="dinov2")
    a.update(np.eye(3)), b.update(np.eye(3))
    with pytest.raises(ValueError, match="extractor"):
        fd_from_stats(a, b)


def test_all_reduce_is_a_no_op_without_distributed() -> None:
    s = FeatureStats(4).update(np.arange(12.0).reshape(3, 4))
    before = (s.count, s.sum.copy(), s.sum_outer.copy())
    s.all_reduce_()
    assert s.count == before[0]
    np.testing.assert_array_equal(s.sum, before[1])
    np.testing.assert_array_equal(s.sum_outer, before[2])


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = np.random.default_rng(100).normal(size=(30, 5))
    s = FeatureStats(5).update(x[rank::world]).all_reduce_()
    s.save(Path(out_dir) / f"rank{rank}.npz")
    dist.destroy_process_group()


def test_all_reduce_sums_across_two_gloo_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    full = FeatureStats(5).update(np.random.default_rng(100).normal(size=(30, 5)))
    for rank in range(2):
        s = FeatureStats.load(tmp_path / f"rank{rank}.npz")
        assert s.count == 30
        np.testing.assert_allclose(s.mean, full.mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.cov, full.cov, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- reference stats / evaluation
def test_ref_key_is_filename_safe_and_distinct() -> None:
    k = ref_key("fashion-mnist", "test", "lite0", resolution=28)
    assert k.startswith("fashion-mnist__test__lite0__28px__")
    odd = ref_key("/data/my set:v2/images.zip", "train", "inception", resolution=32)
    assert "/" not in odd and ":" not in odd and " " not in odd and Path(odd).name == odd
    assert ref_key("a/b", "train", "lite0", resolution=32) != ref_key("a b", "train", "lite0", resolution=32)
    assert ref_key("cifar10", "train", "lite0", resolution=32) != ref_key("cifar10", "train", "lite0", resolution=64)


def test_reference_stats_computes_once_then_reads_the_cache(tmp_path: Path) -> None:
    ext = _PoolExtractor()
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    key = ref_key("toy", "train", ext.name, resolution=28)
    first = reference_stats(images, ext, cache_dir=tmp_path, key=key, batch=10)
    assert (tmp_path / f"{key}.npz").is_file() and first.count == 37 and first.key == key

    def must_not_be_read():
        raise AssertionError("the cached statistics should have been used")
        yield  # pragma: no cover

    again = reference_stats(must_not_be_read(), ext, cache_dir=tmp_path, key=key)
    np.testing.assert_array_equal(again.sum_outer, first.sum_outer)
    # An iterable of (images, labels) batches gives the same statistics as the tensor.
    batches = [(images[i : i + 8], None) for i in range(0, 37, 8)]
    redo = reference_stats(batches, ext, cache_dir=tmp_path, key=key, recompute=True)
    np.testing.assert_allclose(redo.cov, first.cov, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="extractor"):
        reference_stats(images, _PoolExtractor("other"), cache_dir=tmp_path, key=key)
    with pytest.raises(ValueError, match="plain file name"):
        reference_stats(images, ext, cache_dir=tmp_path, key="../escape")


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ectune.metrics import default_cache_dir

    monkeypatch.setenv("ECTUNE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ECTUNE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ectune"


def _toy_generator(seeds: torch.Tensor) -> torch.Tensor:
    """Image i depends on seeds[i] only (per-sample generators), as the evaluation contract requires."""
    out = [torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(int(s)), dtype=torch.uint8) for s in seeds]
    return torch.stack(out)


def test_stats_of_generator_is_independent_of_batch_size() -> None:
    ext = _PoolExtractor()
    seeds = torch.arange(23)
    a = stats_of_generator(_toy_generator, seeds, ext, batch=4)
    b = stats_of_generator(_toy_generator, seeds, ext, batch=23)
    assert a.count == b.count == 23 and a.extractor == ext.name
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.cov, b.cov, rtol=0, atol=1e-10)
    assert fd_from_stats(a, b) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        stats_of_generator(lambda s: torch.zeros(len(s), 1, 8, 8), seeds, ext, batch=4)


# ---------------------------------------------------------------------------------------------- precision / recall
def test_knn_radii_hand_values() -> None:
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(pts, k=1).tolist() == pytest.approx([1.0, 1.0, 2.0, 3.0])
    assert knn_radii(pts, k=2, chunk=3).tolist() == pytest.approx([3.0, 2.0, 3.0, 5.0])


def test_prdc_hand_example_and_limits() -> None:
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0]])  # k=1 radii 1, 1, 2, 3: balls cover [-1, 2] ∪ [1, 5] ∪ [3, 9]
    fake = torch.tensor([[0.5], [2.5], [10.0], [20.0]])  # k=1 radii 2, 2, 7.5, 10
    r = prdc(real, fake, k=1)
    assert r.precision == pytest.approx(2 / 4)  # 0.5 and 2.5 lie in real balls; 10 and 20 do not
    assert r.recall == pytest.approx(1.0)  # 0, 1 in [-1.5, 2.5]; 3 in [0.5, 4.5]; 6 in [2.5, 17.5]
    # density: 0.5 is in the balls of 0 and 1, 2.5 in the ball of 3 -> 3 hits / (k·M = 4)
    assert r.density == pytest.approx(3 / 4)
    assert r.coverage == pytest.approx(3 / 4)  # the balls of 0, 1 and 3 hold a fake point; 6's ball [3, 9] does not
    rng = torch.Generator().manual_seed(7)
    x = torch.randn(200, 8, generator=rng)
    assert precision_recall(x, x.clone(), chunk=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------- extractors
def test_lite0_features_shape_determinism_and_channel_handling(lite0: FeatureExtractor) -> None:
    assert (lite0.name, lite0.report_name, lite0.dim) == ("lite0", "FD-Lite0", 1280)
    g = torch.Generator().manual_seed(8)
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=g)
    rgb = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    f_gray, f_rgb = lite0(gray), lite0(rgb)
    assert f_gray.shape == (2, 1280) and f_rgb.shape == (1, 1280) and f_gray.dtype == torch.float32
    assert torch.isfinite(f_gray).all() and f_gray.abs().sum() > 0
    torch.testing.assert_close(lite0(gray), f_gray, rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(lite0(gray.repeat(1, 3, 1, 1)), f_gray)  # grayscale == RGB with equal channels
    torch.testing.assert_close(lite0(gray[1:2]), f_gray[1:2], rtol=1e-4, atol=1e-4)  # batch-independent
    lite0.train()
    assert not lite0.training and not lite0.net.training
    with pytest.raises(TypeError, match="uint8"):
        lite0(gray.float())
    with pytest.raises(ValueError, match="C = 1 or 3"):
        lite0(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_unknown_extractor_name() -> None:
    with pytest.raises(ValueError, match="lite0"):
        get_extractor("vgg")  # type: ignore[arg-type]


@pytest.fixture
def empty_caches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point torch.hub and ectune at empty folders, so no cached weights can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ECTUNE_CACHE", str(tmp_path / "ectune"))
    return tmp_path


def test_inception_without_weights_raises_one_clear_error(empty_caches: Path) -> None:
    with pytest.raises(ExtractorUnavailableError) as err:
        get_extractor("inception")
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILENAME in msg and "https://" in msg
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in msg  # says where to put it
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        assert "pip install torch-fidelity" in msg
    else:
        assert "torch-fidelity cannot be imported" not in msg


def test_inception_names_an_explicit_missing_weights_file(empty_caches: Path) -> None:
    missing = empty_caches / "nowhere" / INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(ExtractorUnavailableError, match="nowhere"):
        get_extractor("inception", weights=missing)


class _FakeFidelityInception(nn.Module):
    """Stands in for torch_fidelity.FeatureExtractorInceptionV3 (same constructor and output contract)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None) -> None:
        super().__init__()
        assert features_list == ["2048"] and feature_extractor_weights_path is not None
        self.weights_path = feature_extractor_weights_path
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return (self.proj(x.float().mean((2, 3))),)


@pytest.fixture
def fake_torch_fidelity(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("torch_fidelity")
    mod.FeatureExtractorInceptionV3 = _FakeFidelityInception  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", mod)


def test_inception_with_torch_fidelity_but_no_weights_names_the_file(empty_caches: Path, fake_torch_fidelity: None) -> None:
    with pytest.raises(ExtractorUnavailableError) as err:
        get_extractor("inception")
    msg = str(err.value)
    assert INCEPTION_WEIGHTS_FILENAME in msg and "pip install" not in msg


def test_inception_uses_the_cached_weights_file(empty_caches: Path, fake_torch_fidelity: None) -> None:
    cached = empty_caches / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, cached)  # checked as a tensor file; the fake network does not read it
    ext = get_extractor("inception")
    assert (ext.name, ext.report_name, ext.dim) == ("inception", "FID", 2048)
    assert ext.net.weights_path == str(cached)
    assert ext(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 2048)


def test_dinov2_without_cache_raises_one_clear_error(empty_caches: Path) -> None:
    with pytest.raises(ExtractorUnavailableError) as err:
        get_extractor("dinov2")
    msg = str(err.value)
    assert DINOV2_WEIGHTS_FILENAME in msg and DINOV2_HUB_REPO_DIRNAME in msg and "https://" in msg


_FAKE_HUBCONF = '''
import torch
from torch import nn

dependencies = ["torch"]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 1024)

    def forward(self, x):
        assert x.shape[-2:] == (224, 224)
        return self.proj(x.mean((2, 3)))


def dinov2_vitl14(pretrained=True):
    assert not pretrained, "ectune must load the weights itself, never via the hub URL"
    return _Tiny()
'''


def test_dinov2_loads_from_a_local_hub_cache(empty_caches: Path) -> None:
    hub = empty_caches / "torch" / "hub"
    repo = hub / DINOV2_HUB_REPO_DIRNAME
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(_FAKE_HUBCONF)
    sd = {"proj.weight": torch.full((1024, 3), 0.5), "proj.bias": torch.zeros(1024)}
    (hub / "checkpoints").mkdir()
    torch.save(sd, hub / "checkpoints" / DINOV2_WEIGHTS_FILENAME)
    ext = get_extractor("dinov2")
    assert (ext.name, ext.report_name, ext.dim) == ("dinov2", "FD-DINOv2", 1024)
    # A uniform mid-grey image: after ImageNet normalisation each channel is (0.5 - mean_c) / std_c.
    f = ext(torch.full((2, 1, 16, 16), 128, dtype=torch.uint8))
    expected = 0.5 * sum((128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert f.shape == (2, 1024)
    torch.testing.assert_close(f, torch.full((2, 1024), expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- real data
N_REAL = 160  # images per set; three sets at 224² through Lite0 on 2 shared CPU cores


def _digits_as_mnist(tmp_path: Path, n: int) -> torch.Tensor:
    """n real handwritten digits (scikit-learn's UCI 8×8 set) in MNIST format: 28×28 uint8, white on black.

    MNIST centres each digit in a 20×20 box inside a 28×28 frame, so: scale 0..16 -> 0..255, resize to 20×20
    bilinear, pad 4 px of black, then round-trip through an IDX file as the MNIST loaders would read it.
    """
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits().images[:n]  # [n, 8, 8] float in 0..16, ink high like MNIST
    x = torch.from_numpy(digits).float().unsqueeze(1) * (255.0 / 16.0)
    x = nn.functional.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = nn.functional.pad(x, (4, 4, 4, 4)).round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    path = tmp_path / "digits-images-idx3-ubyte"
    _write_idx(path, x)
    back = _read_idx_gz(path)
    assert back.shape == (n, 28, 28) and np.array_equal(back, x)
    return torch.from_numpy(back.copy()).unsqueeze(1)


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not on this machine")
def test_fd_lite0_separates_fashion_mnist_from_digits(lite0: FeatureExtractor, tmp_path: Path) -> None:
    fashion = _read_idx_gz(FASHION_DIR / "t10k-images-idx3-ubyte.gz")  # [10000, 28, 28]
    idx = np.random.default_rng(9).permutation(fashion.shape[0])[: 2 * N_REAL]
    half_a = torch.from_numpy(fashion[idx[:N_REAL]].copy()).unsqueeze(1)
    half_b = torch.from_numpy(fashion[idx[N_REAL:]].copy()).unsqueeze(1)  # disjoint from half_a
    digits = _digits_as_mnist(tmp_path, N_REAL)

    t0 = time.perf_counter()
    fa, fb, fd_ = (lite0(x) for x in (half_a, half_b, digits))
    seconds = time.perf_counter() - t0
    sa, sb, sd = (FeatureStats(1280, extractor="lite0").update(f) for f in (fa, fb, fd_))
    fd_halves = fd_from_stats(sa, sb)
    fd_cross = fd_from_stats(sa, sd)
    pr_halves = precision_recall(fa, fb)
    pr_cross = precision_recall(fa, fd_)
    report = (
        f"FD-Lite0 (n={N_REAL} per set, 224² Lite0 features, {3 * N_REAL} images in {seconds:.1f} s): "
        f"Fashion-MNIST test half vs disjoint half = {fd_halves:.2f}; Fashion-MNIST vs digits = {fd_cross:.2f} "
        f"(ratio {fd_cross / fd_halves:.1f}); k-NN precision/recall halves {pr_halves}, vs digits {pr_cross}"
    )
    print("\n" + report)
    assert math.isfinite(fd_halves) and fd_halves > 0, report
    # Measured at n=160: 59.7 vs 198.7. The halves' FD is mostly small-sample bias (it falls as n grows:
    # 42.0 at n=300, 34.4 at n=400) while the cross FD stays near 190, so the ratio only grows with n.
    assert fd_cross > 2.5 * fd_halves, report
    assert pr_halves[0] > pr_cross[0] and pr_halves[1] > pr_cross[1], report


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("content", ["runs-code", "truncated", "other-network", "not-a-dict"])
def test_bad_extractor_weights_file_gives_one_error_naming_it(tmp_path: Path, content: str) -> None:
    from ectune.metrics.extractors import ExtractorUnavailableError, Lite0Extractor

    path, marker = tmp_path / "weights.pth", tmp_path / "ran"
    if content == "runs-code":
        torch.save({"w": _RunsCode(marker)}, path)
    elif content == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "other-network":
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(ExtractorUnavailableError, match=re.escape(f"{path} is not the EfficientNet-Lite0 weights")):
        Lite0Extractor(weights=path)
    assert not marker.exists()
