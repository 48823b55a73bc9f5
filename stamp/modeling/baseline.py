"""The mean-pool baseline beside every model: mean tile features → logistic / ridge / Cox regression.

Every bag (all tiles of a patient) is averaged to one vector; the vectors are standardised with the
training patients' mean and std, and a penalised linear model is fitted on the training patients:

* classification: multinomial logistic regression (scikit-learn ``LogisticRegressionCV``, L2,
  balanced class weights, the penalty chosen by an inner stratified k-fold on the log-loss);
* regression: ridge regression (``RidgeCV``, penalty by efficient leave-one-out);
* survival: L2-penalised Cox regression (Breslow partial likelihood, L-BFGS), the penalty chosen by
  an inner k-fold on the C-index.

Seconds on a CPU, deterministic (no random state but the seeded inner folds). Predictions come as
:class:`stamp.modeling.predictions.Outputs`, so ``baseline-preds.csv`` has exactly the columns of
``patient-preds.csv`` and the statistics read it with the same code. STAMP writes no such file and
reads none; it is ours.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from stamp.modeling.metrics import concordance_index
from stamp.modeling.predictions import Outputs

__all__ = ["BASELINE_NAME", "BASELINE_PREDS_NAME", "Baseline", "fit_baseline", "mean_pooled"]

BASELINE_PREDS_NAME = "baseline-preds.csv"
BASELINE_NAME = "mean-pool baseline"
_CS = np.logspace(-4, 2, 13)
_ALPHAS = np.logspace(-1, 5, 13)
_COX_PENALTIES = np.logspace(-2, 2, 9)


def mean_pooled(patients: Sequence[Any]) -> np.ndarray:
    """(N, D) float64: each patient's mean tile feature (slide/patient embeddings: the embedding)."""
    from stamp.modeling.data import bag_store

    store = bag_store()
    return np.stack([store.get(p.feature_files)[0].mean(axis=0, dtype=np.float64) for p in patients])


def _cox_loss_grad(beta: np.ndarray, x: np.ndarray, time: np.ndarray, event: np.ndarray, lam: float) -> Any:
    """Breslow negative log partial likelihood / n_events + lam/2 ‖β‖² and its gradient."""
    order = np.argsort(-time, kind="mergesort")  # descending time: risk sets are prefixes
    xs, ts, es = x[order], time[order], event[order]
    eta = xs @ beta
    m = eta.max()
    w = np.exp(eta - m)
    cum_w = np.cumsum(w)
    cum_wx = np.cumsum(w[:, None] * xs, axis=0)
    # tied times share the risk set of the last row of their tie group
    last = np.searchsorted(-ts, -ts, side="right") - 1
    log_risk = np.log(cum_w[last]) + m
    n_events = max(1.0, float(es.sum()))
    loss = -float(np.sum(es * (eta - log_risk))) / n_events + 0.5 * lam * float(beta @ beta)
    grad = -(es[:, None] * (xs - cum_wx[last] / cum_w[last][:, None])).sum(0) / n_events + lam * beta
    return loss, grad


def _row_space(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis (r, D) of the row space of ``x``: ridge coefficients lie in it (n ≪ D)."""
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return np.asarray(vt[s > 1e-8 * max(1.0, float(s.max(initial=0.0)))])


def _fit_cox(z: np.ndarray, time: np.ndarray, event: np.ndarray, lam: float) -> np.ndarray:
    """Ridge Cox coefficients for (already projected) covariates ``z``."""
    res = minimize(
        _cox_loss_grad, np.zeros(z.shape[1]), args=(z, time, event, lam), jac=True, method="L-BFGS-B"
    )
    return np.asarray(res.x)


def _inner_folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]


def _choose_cox_penalty(x: np.ndarray, time: np.ndarray, event: np.ndarray, seed: int) -> float:
    k = int(min(5, max(2, event.sum() // 4)))
    folds = _inner_folds(len(x), k, seed)
    parts = []
    for held in folds:
        keep = np.setdiff1d(np.arange(len(x)), held)
        basis = _row_space(x[keep])
        parts.append((held, keep, x[keep] @ basis.T, x[held] @ basis.T))
    best, best_lam = -math.inf, float(_COX_PENALTIES[len(_COX_PENALTIES) // 2])
    for lam in _COX_PENALTIES:
        risk = np.zeros(len(x))
        for held, keep, z_keep, z_held in parts:
            risk[held] = z_held @ _fit_cox(z_keep, time[keep], event[keep], float(lam))
        score = concordance_index(time, risk, event)
        if not math.isnan(score) and score > best + 1e-9:
            best, best_lam = score, float(lam)
    return best_lam


@dataclass
class Baseline:
    """A fitted mean-pool baseline (feature scaling + the linear model) for one task."""

    task: str
    mean: np.ndarray
    scale: np.ndarray
    model: Any  # sklearn estimator, or the Cox coefficients
    target_mean: float = 0.0
    target_std: float = 1.0
    penalty: float = math.nan
    survival_cut_off: float | None = None

    def _x(self, patients: Sequence[Any]) -> np.ndarray:
        return (mean_pooled(patients) - self.mean) / self.scale

    def predict(self, patients: Sequence[Any], target: str) -> Outputs:
        """Outputs for ``patients`` (``target``: the classification target's column name)."""
        ids = [p.id for p in patients]
        x = self._x(patients)
        if self.task == "classification":
            return Outputs(ids, {target: self.model.predict_log_proba(x)})
        if self.task == "regression":
            return Outputs(ids, {"pred": self.model.predict(x) * self.target_std + self.target_mean})
        return Outputs(ids, {"risk": x @ self.model})


def fit_baseline(patients: Sequence[Any], cohort: Any, seed: int | None = None) -> Baseline:
    """Fit the baseline of ``cohort.task`` on ``patients`` (with targets; single-target tasks)."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import StratifiedKFold

    state = 0 if seed is None else int(seed)
    raw = mean_pooled(patients)
    mean = raw.mean(0)
    scale = raw.std(0)
    scale[scale < 1e-8] = 1.0
    x = (raw - mean) / scale
    if cohort.task == "classification":
        cats = list(cohort.categories[cohort.targets[0]])
        y = np.array([cats.index(str(p.target)) for p in patients])
        smallest = int(np.bincount(y, minlength=len(cats))[np.unique(y)].min())
        folds = StratifiedKFold(max(2, min(5, smallest)), shuffle=True, random_state=state)
        model = LogisticRegressionCV(
            Cs=_CS, cv=folds, scoring="neg_log_loss", class_weight="balanced", max_iter=5000
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y)
        if len(model.classes_) != len(cats):  # a class absent from training: keep the column order
            raise ValueError("the baseline needs every class among its training patients")
        return Baseline("classification", mean, scale, model, penalty=float(np.ravel(model.C_)[0]))
    if cohort.task == "regression":
        y = np.array([float(p.target) for p in patients])
        t_mean, t_std = float(y.mean()), float(y.std()) or 1.0
        model = RidgeCV(alphas=_ALPHAS).fit(x, (y - t_mean) / t_std)
        return Baseline("regression", mean, scale, model, t_mean, t_std, penalty=float(model.alpha_))
    time = np.array([float(p.target[0]) for p in patients])
    event = np.array([float(float(p.target[1]) > 0.5) for p in patients])
    lam = _choose_cox_penalty(x, time, event, state)
    basis = _row_space(x)
    beta = basis.T @ _fit_cox(x @ basis.T, time, event, lam)
    cut_off = float(np.median(x @ beta))
    return Baseline("survival", mean, scale, beta, penalty=lam, survival_cut_off=cut_off)
