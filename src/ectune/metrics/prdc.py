"""k-NN precision and recall (Kynkäänniemi et al. 2019), with density and coverage (Naeem et al. 2020).

Each set's manifold is approximated by balls around its points, each ball's radius being the distance to the
point's k-th nearest neighbour within its own set (the point itself excluded):

    r_k(x; S)  = distance from x to its k-th nearest neighbour in S \\ {x}
    precision  = (1/M) Σ_j 1[ ∃ i : ||y_j - x_i|| ≤ r_k(x_i; X) ]          fake samples on the real manifold
    recall     = (1/N) Σ_i 1[ ∃ j : ||x_i - y_j|| ≤ r_k(y_j; Y) ]          real samples on the fake manifold
    density    = (1/(k M)) Σ_j Σ_i 1[ ||y_j - x_i|| ≤ r_k(x_i; X) ]        (Naeem et al., Eq. 3)
    coverage   = (1/N) Σ_i 1[ ∃ j : ||x_i - y_j|| ≤ r_k(x_i; X) ]          (Naeem et al., Eq. 4)

for real features X = {x_i} (N of them) and generated features Y = {y_j} (M of them). Distances are computed
in float64, ``chunk`` rows at a time, so memory is O(chunk · max(N, M)) rather than O(N · M).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PRDC", "knn_radii", "prdc", "precision_recall"]


class PRDC(NamedTuple):
    """Precision, recall, density and coverage; each is a fraction (density can exceed 1)."""

    precision: float
    recall: float
    density: float
    coverage: float


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances [A, B] between rows of a [A, D] and b [B, D], clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return d.clamp_min_(0.0)


def knn_radii(feats: Tensor, *, k: int = 3, chunk: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set, excluding itself.

    Args:
        feats: [N, D] features, N > k.
        k: neighbour rank.
        chunk: rows per distance block.

    Returns:
        float64 [N] radii r_k.
    """
    x = feats.detach().to("cpu", torch.float64)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k-NN radii need 1 ≤ k < N, got k={k} with N={n} points.")
    out = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, chunk):
        d = _sq_dist(x[i : i + chunk], x)
        rows = torch.arange(i, min(i + chunk, n))
        # The point itself sits at distance 0 (up to round-off); exclude it by index, not by value,
        # so exact duplicates of a point still count as its neighbours.
        d[rows - i, rows] = float("inf")
        out[i : i + chunk] = torch.kthvalue(d, k, dim=1).values
    return out.sqrt_()


def _ball_hits(queries: Tensor, centres: Tensor, radii: Tensor, *, chunk: int) -> Tensor:
    """For each query, how many balls B(centre_i, radius_i) contain it: int64 [Q]."""
    r2 = (radii * radii).unsqueeze(0)
    hits = torch.empty(queries.shape[0], dtype=torch.int64)
    for i in range(0, queries.shape[0], chunk):
        hits[i : i + chunk] = (_sq_dist(queries[i : i + chunk], centres) <= r2).sum(1)
    return hits


def prdc(real: Tensor, fake: Tensor, *, k: int = 3, chunk: int = 1024) -> PRDC:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features.

    Args:
        real: [N, D] reference features (N > k).
        fake: [M, D] generated features (M > k).
        k: neighbour rank for the ball radii (3 as in Kynkäänniemi et al.).
        chunk: rows per distance block.
    """
    x = real.detach().to("cpu", torch.float64)
    y = fake.detach().to("cpu", torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"prdc needs real [N, D] and fake [M, D] features, got {tuple(x.shape)} and {tuple(y.shape)}.")
    r_real = knn_radii(x, k=k, chunk=chunk)
    r_fake = knn_radii(y, k=k, chunk=chunk)
    fake_in_real = _ball_hits(y, x, r_real, chunk=chunk)  # [M]: real balls containing each fake point
    real_in_fake = _ball_hits(x, y, r_fake, chunk=chunk)  # [N]: fake balls containing each real point
    # Coverage asks the transposed question: does a real point's own ball contain any fake point?
    covered = torch.zeros(x.shape[0], dtype=torch.bool)
    r2 = (r_real * r_real).unsqueeze(1)
    for i in range(0, x.shape[0], chunk):
        covered[i : i + chunk] = (_sq_dist(x[i : i + chunk], y) <= r2[i : i + chunk]).any(1)
    return PRDC(
        precision=float((fake_in_real > 0).double().mean()),
        recall=float((real_in_fake > 0).double().mean()),
        density=float(fake_in_real.double().sum() / (k * y.shape[0])),
        coverage=float(covered.double().mean()),
    )


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``; see ``prdc``."""
    r = prdc(real, fake, k=k, chunk=chunk)
    return r.precision, r.recall
