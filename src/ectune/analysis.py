"""Analysis helpers of the evaluation: golden-section search (for the intermediate sampling time) and the
power-law fit FD = K·C^α of the scaling-law study (Sec. 4.2). Pure functions of numbers: no models, no data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def golden_section_search(
    f: Callable[[float], float], lo: float, hi: float, *, iters: int = 8, log: bool = True
) -> tuple[float, list[dict[str, float]]]:
    """Minimise a unimodal f on [lo, hi] by golden-section search (on log x when `log`).

    Uses iters + 2 evaluations of f: the bracket shrinks by 1/φ ≈ 0.618 per iteration, every iteration reusing
    one interior point. Returns (the best x evaluated, history [{"x", "value"}] in evaluation order).
    """
    valid = 0 < lo < hi if log else lo < hi
    if not valid:
        raise ValueError(f"search range must satisfy {'0 < ' if log else ''}lo < hi, got lo={lo}, hi={hi}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    fwd, inv = (math.log, math.exp) if log else ((lambda v: v), (lambda v: v))
    a, b = fwd(lo), fwd(hi)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    history: list[dict[str, float]] = []

    def evaluate(u: float) -> float:
        value = float(f(inv(u)))
        history.append({"x": inv(u), "value": value})
        return value

    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = evaluate(c), evaluate(d)
    for _ in range(iters):
        if fc <= fd:  # the minimum lies in [a, d]: d becomes the old c
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = evaluate(c)
        else:  # the minimum lies in [c, b]
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = evaluate(d)
    best = min(history, key=lambda h: h["value"] if math.isfinite(h["value"]) else math.inf)
    return best["x"], history


@dataclass(frozen=True)
class PowerLawFit:
    """FD ≈ K · C^α fitted by least squares on (log C, log FD) (Sec. 4.2); r, p: Pearson correlation of the logs."""

    K: float
    alpha: float
    r: float
    p_value: float
    n_points: int

    def predict(self, budget: float | np.ndarray) -> float | np.ndarray:
        return self.K * np.asarray(budget, dtype=np.float64) ** self.alpha


def fit_power_law(budgets: Sequence[float], fds: Sequence[float]) -> PowerLawFit:
    """Fit FD = K · C^α over training budgets C (any unit; K is in that unit) by log-log least squares.

    Pure function. Needs at least three points with positive C and FD (two always correlate perfectly; the paper
    uses more). The p-value is scipy.stats.pearsonr's two-sided test of zero correlation.
    """
    from scipy.stats import pearsonr

    c = np.asarray(budgets, dtype=np.float64)
    y = np.asarray(fds, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"budgets and fds must be 1-D sequences of equal length, got {c.shape} and {y.shape}")
    if len(c) < 3:
        raise ValueError(f"a power-law fit needs at least 3 budgets, got {len(c)}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(y)) and np.all(c > 0) and np.all(y > 0)):
        raise ValueError("budgets and FDs must be finite and positive for a log-log fit")
    if np.unique(c).size < 2:
        raise ValueError("a power-law fit needs at least two different budgets")
    lc, ly = np.log(c), np.log(y)
    alpha, log_k = np.polyfit(lc, ly, 1)
    if np.ptp(ly) == 0:  # constant FD: no correlation is defined
        r, p = 0.0, 1.0
    else:
        res = pearsonr(lc, ly)
        r, p = float(res.statistic), float(res.pvalue)
    return PowerLawFit(K=float(np.exp(log_k)), alpha=float(alpha), r=r, p_value=p, n_points=int(len(c)))
