"""Model-selection and summary metrics: AUROC, Harrell's C-index, Pearson r, MAE.

All functions take numpy arrays, ignore missing targets (NaN / ``None`` / negative class index)
and return ``nan`` where the metric is undefined (one class only, no comparable pair, ...).
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = ["auroc", "concordance_index", "mae", "pearson_r"]

_CHUNK = 2048


def auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """AUROC of class-index targets ``y_true`` (N,) against probabilities ``probs`` (N, C).

    Two classes: the usual AUROC of class 1. More classes: the macro mean of one-vs-rest AUROCs
    over the classes present. Entries with a negative index (missing) are skipped.
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    valid = y >= 0
    y, p = y[valid], p[valid]
    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    if p.shape[1] == 2:
        return float(roc_auc_score(y == 1, p[:, 1]))
    scores = [float(roc_auc_score(y == c, p[:, c])) for c in present]
    return float(np.mean(scores))


def concordance_index(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C-index of ``risk`` (higher = worse = shorter survival).

    A pair is comparable when the patient with the shorter time had an event; two patients with
    the same time are comparable only when exactly one had an event (the censored one is taken to
    live longer); two events at the same time are not comparable. A comparable pair is concordant
    when the earlier-failing patient has the higher risk, and counts 1/2 when the risks are equal.
    Patients with NaN time, event or risk are skipped. O(n²) in row blocks, so memory stays small.
    """
    t = np.asarray(time, dtype=np.float64).reshape(-1)
    r = np.asarray(risk, dtype=np.float64).reshape(-1)
    e = np.asarray(event, dtype=np.float64).reshape(-1)
    keep = ~(np.isnan(t) | np.isnan(r) | np.isnan(e))
    t, r, ev = t[keep], r[keep], e[keep] > 0.5
    concordant = 0.0
    pairs = 0
    first = np.flatnonzero(ev)  # only patients with an event can fail first
    for start in range(0, len(first), _CHUNK):
        i = first[start : start + _CHUNK]
        ti, ri = t[i][:, None], r[i][:, None]
        comparable = (ti < t[None, :]) | ((ti == t[None, :]) & ~ev[None, :])
        pairs += int(comparable.sum())
        concordant += float((comparable & (ri > r[None, :])).sum())
        concordant += 0.5 * float((comparable & (ri == r[None, :])).sum())
    return concordant / pairs if pairs else math.nan


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson correlation over pairs without NaN (nan if fewer than 2 or a constant side)."""
    a = np.asarray(y_true, dtype=np.float64).reshape(-1)
    b = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error over pairs without NaN (nan if none)."""
    a = np.asarray(y_true, dtype=np.float64).reshape(-1)
    b = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    keep = ~(np.isnan(a) | np.isnan(b))
    return float(np.abs(a[keep] - b[keep]).mean()) if keep.any() else math.nan
