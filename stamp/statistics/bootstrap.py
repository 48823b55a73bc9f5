"""Vectorised bootstrap over patients and Student-t intervals over folds.

A bootstrap draws ``n_bootstrap`` resamples of the patients with replacement from
``numpy.random.default_rng(seed)``; every metric is computed for all resamples at once on (B, n)
arrays (rank-based AUROC, threshold-grouped average precision, confusion-count F1), which agree
with scikit-learn's definitions, ties included. Draws holding one class only are skipped, as in
STAMP. The 95 % CI is the 2.5 / 97.5 % percentile of the valid draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "ClassBootstrap",
    "bootstrap_class",
    "bootstrap_regression",
    "percentile_ci",
    "resample_indices",
    "t_interval",
]

GRID = np.linspace(0.0, 1.0, 1000)
_CELLS = 1_000_000  # (B × n) cells per chunk, bounds memory for large cohorts


def resample_indices(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) patient indices drawn with replacement, reproducible from ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))


def _chunks(idx: np.ndarray) -> Iterator[np.ndarray]:
    step = max(1, _CELLS // max(1, idx.shape[1]))
    for start in range(0, len(idx), step):
        yield idx[start : start + step]


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    """2.5 / 97.5 % percentiles of the finite ``values`` (NaN, NaN when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def t_interval(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float, float]:
    """Mean and Student-t interval ``mean ± t(1-α/2, n-1) · s/√n`` of the finite ``values``.

    One value gives (value, NaN, NaN); none gives NaNs. ``bounds``: the metric's range (e.g.
    ``(0, 1)`` for AUROC); the interval is clipped to it (an AUROC CI never reaches 1.36).
    """
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size))
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return mean, lo, hi


def _average_precision(y: np.ndarray, s: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """AP = Σ over positives of precision at their score's threshold (ties grouped) / positives."""
    order = np.argsort(-s, axis=1, kind="stable")
    cum_pos = np.cumsum(np.take_along_axis(y, order, axis=1), axis=1)
    at_or_above = stats.rankdata(-s, method="max", axis=1).astype(np.int64)  # patients with score >= s_i
    tp = np.take_along_axis(cum_pos, at_or_above - 1, axis=1)  # positives with score >= s_i
    return (y * tp / at_or_above).sum(1) / n_pos


def _auroc(y: np.ndarray, s: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    n = y.shape[1]
    ranks = stats.rankdata(s, axis=1)
    return ((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


def _f1(y: np.ndarray, hit: np.ndarray) -> np.ndarray:
    tp = (y & hit).sum(1)
    denom = y.sum(1) + hit.sum(1)
    return np.divide(2.0 * tp, denom, out=np.zeros(len(y)), where=denom > 0)


def _curves(y_row: np.ndarray, s_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) and precision at the distinct thresholds of one resample, from (0, 0)."""
    order = np.argsort(-s_row, kind="stable")
    ss, yy = s_row[order], y_row[order]
    ends = np.r_[ss[1:] != ss[:-1], True]
    tp = np.cumsum(yy)[ends]
    fp = np.cumsum(~yy)[ends]
    fpr = np.r_[0.0, fp / fp[-1]]
    tpr = np.r_[0.0, tp / tp[-1]]
    precision = np.r_[1.0, tp / (tp + fp)]
    return fpr, tpr, precision


@dataclass
class ClassBootstrap:
    """Bootstrap of one class (one-vs-rest): per-draw metrics (valid draws) and curve bands."""

    roc_auc_score: np.ndarray
    average_precision_score: np.ndarray
    f1_score: np.ndarray
    roc_band: tuple[np.ndarray, np.ndarray]  # TPR 2.5 / 97.5 % on GRID (FPR)
    pr_band: tuple[np.ndarray, np.ndarray]  # precision 2.5 / 97.5 % on GRID (recall)

    def ci(self, metric: str) -> tuple[float, float]:
        """95 % percentile interval of ``metric`` over the valid draws."""
        return percentile_ci(getattr(self, metric))


def bootstrap_class(y: np.ndarray, score: np.ndarray, hit: np.ndarray, idx: np.ndarray) -> ClassBootstrap:
    """Bootstrap AUROC, AP, F1 and ROC/PR bands for labels ``y`` (bool), ``score`` and argmax ``hit``."""
    auc, ap, f1, tprs, precs = [], [], [], [], []
    for part in _chunks(idx):
        yb, sb, hb = y[part], score[part], hit[part]
        n_pos = yb.sum(1)
        ok = (n_pos > 0) & (n_pos < yb.shape[1])  # skip one-class draws
        yb, sb, hb, n_pos = yb[ok], sb[ok], hb[ok], n_pos[ok]
        if not len(yb):
            continue
        auc.append(_auroc(yb, sb, n_pos))
        ap.append(_average_precision(yb, sb, n_pos))
        f1.append(_f1(yb, hb))
        for y_row, s_row in zip(yb, sb, strict=True):
            fpr, tpr, precision = _curves(y_row, s_row)
            tprs.append(np.interp(GRID, fpr, tpr))
            precs.append(np.interp(GRID, tpr, precision))

    def band(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.full_like(GRID, np.nan), np.full_like(GRID, np.nan)
        lo, hi = np.percentile(np.stack(rows), [2.5, 97.5], axis=0)
        return lo, hi

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0)

    return ClassBootstrap(cat(auc), cat(ap), cat(f1), band(tprs), band(precs))


def bootstrap_regression(y: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-draw ``r2_score, pearson_r, mae, rmse``; draws with constant truth or prediction skipped."""
    out: dict[str, list[np.ndarray]] = {"r2_score": [], "pearson_r": [], "mae": [], "rmse": []}
    for part in _chunks(idx):
        yb, pb = y[part], pred[part]
        yc = yb - yb.mean(1, keepdims=True)
        pc = pb - pb.mean(1, keepdims=True)
        ss_y, ss_p = (yc**2).sum(1), (pc**2).sum(1)
        ok = (ss_y > 0) & (ss_p > 0)
        err = yb[ok] - pb[ok]
        out["r2_score"].append(1.0 - (err**2).sum(1) / ss_y[ok])
        out["pearson_r"].append((yc[ok] * pc[ok]).sum(1) / np.sqrt(ss_y[ok] * ss_p[ok]))
        out["mae"].append(np.abs(err).mean(1))
        out["rmse"].append(np.sqrt((err**2).mean(1)))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in out.items()}
