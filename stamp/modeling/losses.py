"""Training losses per task (stamp-facts §2.5), written from the formulas.

* classification: cross-entropy with class weights ``w_c ∝ N / n_c`` normalised to sum 1, averaged
  as a weighted mean over the batch (``Σ w_{y_i} ℓ_i / Σ w_{y_i}``); targets equal to
  :data:`IGNORE_INDEX` (a missing label) do not count.
* multi-target classification: the sum of the per-target weighted cross-entropies; a target with
  no label in the batch adds 0.
* regression: L1 (mean absolute error) over the targets that are not NaN.
* survival: the negative Cox partial log-likelihood per event, with Efron's (default) or
  Breslow's handling of tied event times; a batch without events gives 0 (with a gradient path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "TargetCodec",
    "class_weights",
    "cox_partial_likelihood_loss",
    "l1_loss",
    "multi_target_cross_entropy",
    "weighted_cross_entropy",
]

IGNORE_INDEX = -100
FEW_PATIENTS_WARNING = 16

_logger = logging.getLogger("stamp")


def class_weights(labels: Sequence[str | None], categories: Sequence[str], *, target: str = "") -> np.ndarray:
    """Weights ``∝ N / n_c`` over ``categories`` from the training labels, normalised to sum 1.

    ``None`` labels (missing) are not counted. A category without any training patient gets weight
    0 (and a warning); a category with fewer than 16 patients gets a warning, as in STAMP.
    """
    counts = np.array([sum(1 for v in labels if v == c) for c in categories], dtype=np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError(f"no training patient has a label for target {target or '?'!r}")
    name = f" of {target!r}" if target else ""
    for category, n in zip(categories, counts, strict=True):
        if n == 0:
            _logger.warning("category %r%s has no training patients; its weight is 0", category, name)
        elif n < FEW_PATIENTS_WARNING:
            _logger.warning(
                "category %r%s has only %d training patients (< %d); results may be unreliable",
                category,
                name,
                int(n),
                FEW_PATIENTS_WARNING,
            )
    raw = np.where(counts > 0, total / np.maximum(counts, 1), 0.0)
    return raw / raw.sum()


def weighted_cross_entropy(logits: Tensor, target: Tensor, weights: Tensor | None) -> Tensor:
    """Class-weighted mean cross-entropy of ``logits`` (B, C) against class indices ``target`` (B,).

    Entries equal to :data:`IGNORE_INDEX` are skipped; if every entry is skipped the loss is 0.
    """
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], target[valid], weight=weights)


def multi_target_cross_entropy(
    logits: Sequence[Tensor], targets: Tensor, weights: Sequence[Tensor | None]
) -> Tensor:
    """Sum over targets of :func:`weighted_cross_entropy`; ``targets`` is (B, T) of class indices."""
    total = logits[0].sum() * 0.0
    for t, (out, w) in enumerate(zip(logits, weights, strict=True)):
        total = total + weighted_cross_entropy(out, targets[:, t], w)
    return total


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over the entries of ``target`` that are not NaN (0 if there are none)."""
    pred = pred.reshape(-1)
    target = target.reshape(-1).to(pred.dtype)
    valid = ~torch.isnan(target)
    if not bool(valid.any()):
        return pred.sum() * 0.0
    return (pred[valid] - target[valid]).abs().mean()


def cox_partial_likelihood_loss(
    risk: Tensor, time: Tensor, event: Tensor, *, ties: Literal["efron", "breslow"] = "efron"
) -> Tensor:
    """Negative Cox partial log-likelihood per event; ``risk`` (B,) is the log hazard (higher = worse).

    For an event ``i`` at time ``t_i`` with ``d_i`` events tied at that time, of which ``i`` is the
    ``l_i``-th (0-based), the Efron term is
    ``η_i − log(Σ_{t_j ≥ t_i} e^{η_j} − (l_i / d_i) Σ_{t_j = t_i, event} e^{η_j})``; Breslow sets
    ``l_i = 0``. The loss is ``−Σ_events term / n_events``. Patients with NaN time or event and
    batches without events contribute nothing (the latter give 0).
    """
    eta = risk.reshape(-1)
    time = time.reshape(-1).to(eta.dtype)
    event = event.reshape(-1).to(eta.dtype)
    keep = ~(torch.isnan(time) | torch.isnan(event))
    eta, time, event = eta[keep], time[keep], event[keep] > 0.5
    n_events = int(event.sum())
    if n_events == 0:
        return risk.sum() * 0.0
    shift = eta.detach().max()
    exp_eta = torch.exp(eta - shift)
    at_risk = time.unsqueeze(0) >= time.unsqueeze(1)  # [i, j]: j still at risk at t_i
    risk_sum = (at_risk.to(eta.dtype) * exp_eta.unsqueeze(0)).sum(1)
    if ties == "efron":
        tied = (time.unsqueeze(0) == time.unsqueeze(1)) & event.unsqueeze(0) & event.unsqueeze(1)
        tied_sum = (tied.to(eta.dtype) * exp_eta.unsqueeze(0)).sum(1)
        n_tied = tied.sum(1).to(eta.dtype)
        # rank of i among the events tied with it (by index order)
        idx = torch.arange(len(eta), device=eta.device)
        rank = (tied & (idx.unsqueeze(0) < idx.unsqueeze(1))).sum(1).to(eta.dtype)
        denom = risk_sum - torch.where(n_tied > 0, rank / n_tied.clamp(min=1), 0.0) * tied_sum
    elif ties == "breslow":
        denom = risk_sum
    else:
        raise ValueError(f"ties must be 'efron' or 'breslow', not {ties!r}")
    log_lik = (eta - shift) - torch.log(denom)
    return -(log_lik[event]).sum() / n_events


# --------------------------------------------------------------------------- targets ↔ tensors ↔ loss


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class TargetCodec:
    """How one task's ``Patient.target`` values become tensors, and which loss applies.

    Raw model outputs are (N, n_out) tensors, or a list of (N, C_t) tensors for multi-target
    models; :meth:`per_target` gives the per-target logits either way.
    """

    task: str
    feature_type: str
    targets: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    target_mean: float | None = None
    target_std: float | None = None
    ties: Literal["efron", "breslow"] = "efron"

    @classmethod
    def from_cohort(cls, cohort: Any, train: Sequence[Any] = ()) -> TargetCodec:
        """From a ``CohortData``; regression standardisation comes from the ``train`` patients."""
        targets = list(cohort.targets)
        categories = (
            {t: list(cohort.categories[t]) for t in targets} if cohort.task == "classification" else {}
        )
        codec = cls(cohort.task, cohort.feature_type, targets, categories)
        if cohort.task == "regression":
            values = np.array([float(p.target) for p in train if not _is_missing(p.target)], dtype=np.float64)
            mean = float(values.mean()) if len(values) else 0.0
            std = float(values.std()) if len(values) > 1 else 1.0
            codec.target_mean, codec.target_std = mean, std if std > 0 else 1.0
        return codec

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> TargetCodec:
        """From a checkpoint's ``meta``."""
        return cls(
            meta["task"],
            meta["feature_type"],
            list(meta["targets"]),
            {t: list(c) for t, c in (meta.get("categories") or {}).items()},
            meta.get("target_mean"),
            meta.get("target_std"),
        )

    @property
    def multi(self) -> bool:
        return self.task == "classification" and len(self.targets) > 1

    @property
    def class_targets(self) -> list[str]:
        return self.targets if self.task == "classification" else []

    @property
    def ground_truth_label(self) -> str | list[str] | None:
        if self.task == "survival":
            return None
        return list(self.targets) if self.multi else self.targets[0]

    @property
    def n_outputs(self) -> int | list[int]:
        if self.task != "classification":
            return 1
        sizes = [len(self.categories[t]) for t in self.targets]
        return sizes if self.multi else sizes[0]

    def labels(self, patients: Sequence[Any], target: str) -> list[str | None]:
        """Class labels of ``target`` per patient (``None`` where missing)."""
        if not self.multi:
            return [None if _is_missing(p.target) else str(p.target) for p in patients]
        out = []
        for p in patients:
            value = p.target.get(target) if isinstance(p.target, Mapping) else None
            out.append(None if _is_missing(value) else str(value))
        return out

    def _index(self, label: str | None, target: str) -> int:
        cats = self.categories[target]
        return cats.index(label) if label is not None and label in cats else IGNORE_INDEX

    def encode(self, patients: Sequence[Any]) -> Tensor:
        """classification (N,) or (N, T) long; regression (N,) standardised float; survival (N, 2)."""
        if self.task == "classification":
            cols = [[self._index(v, t) for v in self.labels(patients, t)] for t in self.targets]
            y = torch.tensor(cols, dtype=torch.long).T
            return y if self.multi else y[:, 0]
        if self.task == "regression":
            mean, std = self.target_mean or 0.0, self.target_std or 1.0
            vals = [math.nan if _is_missing(p.target) else (float(p.target) - mean) / std for p in patients]
            return torch.tensor(vals, dtype=torch.float32)
        time, event = self.survival_arrays(patients)
        return torch.tensor(np.stack([time, event], 1), dtype=torch.float32)

    def survival_arrays(self, patients: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(time, event) float arrays, NaN where missing."""
        time, event = [], []
        for p in patients:
            value = p.target if isinstance(p.target, (tuple, list)) else (None, None)
            time.append(math.nan if _is_missing(value[0]) else float(value[0]))
            event.append(math.nan if _is_missing(value[1]) else float(value[1]))
        return np.array(time, dtype=np.float64), np.array(event, dtype=np.float64)

    def per_target(self, raw: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """Per-target logits of a classification output."""
        if isinstance(raw, (list, tuple)):
            return list(raw)
        assert isinstance(raw, Tensor)
        if self.multi:
            sizes = self.n_outputs
            assert isinstance(sizes, list)
            return list(torch.split(raw, sizes, dim=1))
        return [raw]

    def loss(
        self, raw: Tensor | Sequence[Tensor], y: Tensor, weights: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """The task's training loss of raw outputs against encoded targets ``y``."""
        if self.task == "classification":
            logits = self.per_target(raw)
            w = [None if weights is None else weights.get(t) for t in self.targets]
            if self.multi:
                return multi_target_cross_entropy(logits, y, w)
            return weighted_cross_entropy(logits[0], y, w[0])
        assert isinstance(raw, Tensor)
        if self.task == "regression":
            return l1_loss(raw, y)
        return cox_partial_likelihood_loss(raw.reshape(-1), y[:, 0], y[:, 1], ties=self.ties)
