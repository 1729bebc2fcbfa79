"""Fréchet distance between Gaussians fitted to feature sets, and the streaming statistics behind it.

The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is

    FD = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})                      (Dowson & Landau 1982)

It is the FID of Heusel et al. (2017) when the features are the 2048-d pool features of the 2015-12-05
Inception-v3, and "FD_DINOv2" (Stein et al. 2023) with DINOv2 ViT-L/14 CLS features. Which extractor
produced a number is part of its name: see ``extractors.FeatureExtractor.report_name``.

``FeatureStats`` keeps sufficient statistics (count, sum, sum of outer products) in float64 so that batches,
processes and ranks combine by plain addition: the result does not depend on how the data was split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..runtime.checkpoint import atomic_write

__all__ = ["FeatureStats", "frechet_distance"]

# Version of the .npz layout written by FeatureStats.save; bump when the fields change.
_STATS_FORMAT = 1


class FeatureStats:
    """Streaming first and second moments of a feature set, exact in float64.

    State for D-dimensional features x_1..x_N:
        count = N,   sum = Σ x_i  [D],   sum_outer = Σ x_i x_iᵀ  [D, D].
    From these, mean = sum / N and the unbiased covariance
        cov = (sum_outer - N · mean meanᵀ) / (N - 1).
    float64 keeps the cancellation in the covariance harmless for network features (|mean| ≲ 10³·std);
    this is the same one-pass form that clean-fid and EDM use, and it is what makes ``merge`` exact.

    Attributes:
        dim: feature dimension D.
        extractor: name of the feature extractor that produced the features ("" when unknown).
        key: dataset/reference key the statistics describe ("" when unknown).
    """

    def __init__(self, dim: int, *, extractor: str = "", key: str = "") -> None:
        if dim <= 0:
            raise ValueError(f"FeatureStats needs a positive feature dimension, got dim={dim}.")
        self.dim = int(dim)
        self.extractor = extractor
        self.key = key
        self.count = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    # ------------------------------------------------------------------ accumulation
    def update(self, feats: Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features.

        Args:
            feats: [N, D] features (any float dtype, any device); converted to float64 on the CPU.

        Returns:
            self, so calls can be chained.
        """
        x = _as_f64(feats)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update expects features of shape [N, {self.dim}], got {tuple(x.shape)}.")
        if not np.isfinite(x).all():
            raise ValueError("FeatureStats.update got non-finite features (NaN or inf); check the images and extractor.")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set's statistics into this one (in place); associative and commutative.

        Returns:
            self, so ``a.merge(b).merge(c)`` equals the statistics of the concatenated features.
        """
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge FeatureStats of dimension {other.dim} into dimension {self.dim}.")
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise ValueError(f"Cannot merge features of extractor {other.extractor!r} into {self.extractor!r}.")
        self.extractor = self.extractor or other.extractor
        self.key = self.key or other.key
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def all_reduce_(self) -> FeatureStats:
        """Sum the statistics over all torch.distributed ranks, in place (a no-op when not initialised).

        Every rank must call this (it is a collective). The three fields travel in one float64 buffer, on the
        current CUDA device for the NCCL backend (which cannot reduce CPU tensors) and on the CPU otherwise.
        Counts are exact in float64 up to 2⁵³ samples.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flat = np.concatenate([[float(self.count)], self.sum, self.sum_outer.ravel()])
        buf = torch.from_numpy(flat).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.cpu().numpy()
        self.count = int(round(out[0]))
        self.sum = out[1 : 1 + self.dim].copy()
        self.sum_outer = out[1 + self.dim :].reshape(self.dim, self.dim).copy()
        return self

    # ------------------------------------------------------------------ moments
    @property
    def mean(self) -> np.ndarray:
        """mu = sum / N, float64 [D]."""
        if self.count < 1:
            raise ValueError("FeatureStats.mean needs at least one sample; none were added.")
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance S = (Σ x xᵀ - N mu muᵀ) / (N - 1), float64 [D, D], exactly symmetric."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.cov needs at least two samples, got {self.count}.")
        mu = self.mean
        s = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        # Summation round-off can leave S a hair asymmetric; the eigen solver downstream assumes symmetry.
        return 0.5 * (s + s.T)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the statistics to ``path`` as an uncompressed .npz (plain arrays, no pickle), atomically.

        Fields: count, sum [D], sum_outer [D, D], and the strings extractor, key, format.
        """
        path = Path(path)
        atomic_write(path, lambda f: np.savez(  # a file object: numpy appends no ".npz" to the name
            f,
            count=np.int64(self.count),
            sum=self.sum,
            sum_outer=self.sum_outer,
            extractor=np.str_(self.extractor),
            key=np.str_(self.key),
            format=np.int64(_STATS_FORMAT),
        ))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by ``save`` (``allow_pickle=False``: the file is data, never code)."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            missing = {"count", "sum", "sum_outer", "extractor", "key", "format"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not an ectune FeatureStats file: fields {sorted(missing)} are missing.")
            if int(z["format"]) != _STATS_FORMAT:
                raise ValueError(f"{path} has FeatureStats format {int(z['format'])}, expected {_STATS_FORMAT}.")
            s = z["sum"]
            stats = cls(s.shape[0], extractor=str(z["extractor"]), key=str(z["key"]))
            stats.count = int(z["count"])
            stats.sum = s.astype(np.float64)
            stats.sum_outer = z["sum_outer"].astype(np.float64)
        if stats.sum_outer.shape != (stats.dim, stats.dim):
            raise ValueError(f"{path}: sum_outer has shape {stats.sum_outer.shape}, expected {(stats.dim, stats.dim)}.")
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count}, extractor={self.extractor!r}, key={self.key!r})"


def _as_f64(a: np.ndarray | Tensor) -> np.ndarray:
    """A float64 NumPy copy of an array or tensor (any device)."""
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def frechet_distance(
    mu1: np.ndarray | Tensor,
    sigma1: np.ndarray | Tensor,
    mu2: np.ndarray | Tensor,
    sigma2: np.ndarray | Tensor,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

        FD = ||mu1 - mu2||² + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

    The trace term uses a symmetric form. With S1 = V diag(λ) Vᵀ (eigh), S1 S2 is similar to
    S1^{1/2} S2 S1^{1/2} = V M Vᵀ with M = diag(√λ) (Vᵀ S2 V) diag(√λ), so both have the same non-negative
    eigenvalues μ_i and Tr((S1 S2)^{1/2}) = Σ_i √μ_i(M). M is symmetric PSD, so ``eigh`` applies: no complex
    parts, no failure on singular covariances (N < D), and no eps jitter (which would bias the result).
    Directions where S1 is numerically zero (λ ≤ D·eps·λ_max) contribute nothing and are dropped, so M is
    only r×r for rank r; likewise eigenvalues of M below its round-off level count as 0, or else the square
    roots of ~1e-16-sized noise, summed over a null space, would add up to a visible error.
    Equals the usual ``Tr(scipy.linalg.sqrtm(S1 @ S2))`` (tested), with one D×D eigh instead of a Schur form.

    Args:
        mu1, mu2: means [D].
        sigma1, sigma2: covariances [D, D], symmetric PSD.

    Returns:
        FD ≥ 0. Negative values within round-off are clamped to 0; anything more negative raises, because it
        means the inputs were not covariance matrices.
    """
    m1, m2, s1, s2 = (_as_f64(a) for a in (mu1, mu2, sigma1, sigma2))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape} "
            f"do not describe two Gaussians of the same dimension."
        )
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    eps_d = d * np.finfo(np.float64).eps
    lam, v = np.linalg.eigh(s1)
    keep = lam > eps_d * max(float(lam.max(initial=0.0)), 0.0)
    root, v = np.sqrt(lam[keep]), v[:, keep]  # [r], [D, r]
    m = (v.T @ s2 @ v) * root[:, None] * root[None, :]  # diag(√λ) Vᵀ S2 V diag(√λ), [r, r]
    mu = np.linalg.eigvalsh(0.5 * (m + m.T)) if m.size else np.zeros(0)
    tr_covmean = float(np.sqrt(mu[mu > eps_d * max(float(np.abs(mu).max(initial=0.0)), 0.0)]).sum())

    diff = m1 - m2
    tr1, tr2 = float(np.trace(s1)), float(np.trace(s2))
    fd = float(diff @ diff) + tr1 + tr2 - 2.0 * tr_covmean
    if fd < 0.0:
        scale = float(diff @ diff) + tr1 + tr2
        if fd < -1e-8 * max(scale, 1e-300):
            raise ValueError(f"frechet_distance came out negative ({fd:.3e}); are sigma1 and sigma2 PSD covariances?")
        fd = 0.0
    return fd
