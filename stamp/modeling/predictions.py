"""``patient-preds.csv`` tables with STAMP's columns per task (stamp-facts §3.5), and ensembles.

Model outputs travel as :class:`Outputs`: per target the log-probabilities (classification), the
prediction (regression, original units) or the Cox risk (survival, higher = worse).

Columns:

* classification: ``<patient_label>, <target>, pred, <target>_<class>…, loss``; multi-target:
  ``<patient_label>, <target>…, pred_<target>, <target>_<class>… (per target), loss``. ``loss`` is
  the cross-entropy ``−log p(true class)`` computed from the logits (STAMP applies the
  cross-entropy to the already-softmaxed probabilities; we do not), summed over targets; rows
  sorted by loss, missing last.
* regression: ``<patient_label>, <target>, pred, loss`` (absolute error), sorted by loss.
* survival: ``<patient_label>, pred_score, <time_label>, <status_label>`` and an empty last column
  named ``cut_off=<training median risk>``; rows in patient order.

Ensemble tables have the same columns computed from the models' mean (mean probability, mean
prediction, mean risk) plus the spread across models in columns prefixed ``std_``
(``std_<target>_<class>``, ``std_pred``, ``std_pred_score``), which no STAMP column name starts with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp
from torch.utils.data import DataLoader

from stamp.escaping import csv_safe_frame
from stamp.fileio import atomic_path
from stamp.stopping import check_stop

__all__ = [
    "PREDS_NAME",
    "Outputs",
    "bag_dataset",
    "ensemble_outputs",
    "forward_all",
    "patient_preds_table",
    "to_outputs",
    "write_csv",
]

PREDS_NAME = "patient-preds.csv"


@dataclass
class Outputs:
    """Model outputs for ``patient_ids`` (one row each).

    ``values``: classification ``{target: log-probabilities (N, C)}``; regression ``{"pred": (N,)}``;
    survival ``{"risk": (N,)}``. ``spread`` (ensembles only) has the same keys: the standard
    deviation across models of the probabilities / predictions / risks.
    """

    patient_ids: list[str]
    values: dict[str, np.ndarray]
    spread: dict[str, np.ndarray] | None = None


def ensemble_outputs(outputs: Sequence[Outputs]) -> Outputs:
    """Mean (and spread) of several models' outputs for the same patients, in the same order."""
    first = outputs[0]
    for other in outputs[1:]:
        if other.patient_ids != first.patient_ids or other.values.keys() != first.values.keys():
            raise ValueError("ensemble members must predict the same patients and targets")
    values: dict[str, np.ndarray] = {}
    spread: dict[str, np.ndarray] = {}
    for key in first.values:
        stack = np.stack([o.values[key] for o in outputs])
        if key in ("pred", "risk"):
            values[key] = stack.mean(0)
            spread[key] = stack.std(0)
        else:  # log-probabilities: log of the mean probability
            values[key] = logsumexp(stack, axis=0) - math.log(len(outputs))
            spread[key] = np.exp(stack).std(0)
    return Outputs(list(first.patient_ids), values, spread)


def _sorted_by_loss(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("loss", kind="mergesort", na_position="last").reset_index(drop=True)


def _class_targets(task_targets: Sequence[str], truths: Sequence[Any]) -> list[list[str | None]]:
    """Ground truth per target (list per patient row) from ``Patient.target`` values."""
    multi = len(task_targets) > 1
    rows: list[list[str | None]] = []
    for truth in truths:
        if multi:
            mapping = truth if isinstance(truth, Mapping) else {}
            rows.append([_str_or_none(mapping.get(t)) for t in task_targets])
        else:
            rows.append([_str_or_none(truth)])
    return rows


def _str_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _classification(
    out: Outputs,
    truths: Sequence[Any],
    targets: Sequence[str],
    categories: Mapping[str, Sequence[str]],
    patient_label: str,
) -> pd.DataFrame:
    multi = len(targets) > 1
    gt = _class_targets(targets, truths)
    n = len(out.patient_ids)
    data: dict[str, Any] = {patient_label: out.patient_ids}
    for t, target in enumerate(targets):
        data[target] = [row[t] for row in gt]
    loss = np.zeros(n)
    has_gt = np.zeros(n, dtype=bool)
    for t, target in enumerate(targets):
        cats = list(categories[target])
        logp = np.asarray(out.values[target], dtype=np.float64)
        probs = np.exp(logp)
        data["pred_" + target if multi else "pred"] = [cats[i] for i in logp.argmax(1)]
        for c, cat in enumerate(cats):
            data[f"{target}_{cat}"] = probs[:, c]
        for i, row in enumerate(gt):
            label = row[t]
            if label is not None and label in cats:
                loss[i] += -float(logp[i][cats.index(label)])
                has_gt[i] = True
    data["loss"] = np.where(has_gt, loss, np.nan)
    df = pd.DataFrame(data)
    if out.spread is not None:
        for target in targets:
            for c, cat in enumerate(categories[target]):
                df[f"std_{target}_{cat}"] = out.spread[target][:, c]
    return _sorted_by_loss(df)


def _regression(out: Outputs, truths: Sequence[Any], target: str, patient_label: str) -> pd.DataFrame:
    truth = np.array([np.nan if v is None else float(v) for v in truths], dtype=np.float64)
    pred = np.asarray(out.values["pred"], dtype=np.float64)
    df = pd.DataFrame(
        {patient_label: out.patient_ids, target: truth, "pred": pred, "loss": np.abs(pred - truth)}
    )
    if out.spread is not None:
        df["std_pred"] = out.spread["pred"]
    return _sorted_by_loss(df)


def _survival(
    out: Outputs,
    truths: Sequence[Any],
    time_label: str,
    status_label: str,
    patient_label: str,
    cut_off: float | None,
) -> pd.DataFrame:
    times, events = [], []
    for v in truths:
        time, event = v if isinstance(v, (tuple, list)) else (None, None)
        times.append(np.nan if time is None else float(time))
        events.append(pd.NA if event is None or math.isnan(float(event)) else int(float(event) > 0.5))
    df = pd.DataFrame(
        {
            patient_label: out.patient_ids,
            "pred_score": np.asarray(out.values["risk"], dtype=np.float64),
            time_label: times,
            status_label: pd.array(events, dtype="Int64"),
        }
    )
    if out.spread is not None:
        df["std_pred_score"] = out.spread["risk"]
    if cut_off is not None and not math.isnan(cut_off):
        df[f"cut_off={cut_off}"] = ""
    return df


def patient_preds_table(
    out: Outputs,
    truths: Sequence[Any],
    *,
    task: str,
    targets: Sequence[str],
    categories: Mapping[str, Sequence[str]] | None = None,
    patient_label: str = "PATIENT",
    cut_off: float | None = None,
) -> pd.DataFrame:
    """The ``patient-preds.csv`` table for ``out``; ``truths[i]`` is patient i's ``Patient.target``.

    ``targets``: classification the ground-truth column(s); regression ``[label]``; survival
    ``[time_label, status_label]``.
    """
    if len(truths) != len(out.patient_ids):
        raise ValueError("one ground-truth entry per patient is needed (None where unknown)")
    if task == "classification":
        return _classification(out, truths, targets, categories or {}, patient_label)
    if task == "regression":
        return _regression(out, truths, targets[0], patient_label)
    if task == "survival":
        return _survival(out, truths, targets[0], targets[1], patient_label, cut_off)
    raise ValueError(f"unknown task {task!r}")


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` to ``path`` without the index, atomically (temp file + rename).

    Text cells a spreadsheet would read as a formula (a patient id ``=1+1``) get a leading
    ``'`` (:func:`stamp.escaping.csv_safe`); our readers strip it (``csv_unguard_frame``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        csv_safe_frame(df).to_csv(tmp, index=False)
    return path


# --------------------------------------------------------------------------- running a model


def bag_dataset(patients: Sequence[Any], *, cache: bool) -> Any:
    """Full-bag dataset (every tile, no sampling) of ``patients``, in their order."""
    from stamp.modeling.data import BagDataset

    return BagDataset(list(patients), bag_size=None, seed=None, cache=cache)


def forward_all(
    model: torch.nn.Module,
    dataset: Any,
    *,
    feature_type: str,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    max_batch_tiles: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Raw outputs of ``model`` (eval mode, full bags) for every item of ``dataset``, in order.

    Tile bags go one patient at a time without a padding mask, so memory is bounded by the largest
    bag (and the model's own attention kernels); slide/patient embeddings are batched.
    ``max_batch_tiles`` (tile bags, in-process data only): bags sorted by size go in padded,
    masked batches of at most that many tiles (a larger bag alone); same outputs up to rounding.
    Returns an (N, n_out) CPU float tensor, or a list of them for multi-target models.
    """
    from stamp.modeling.data import collate_bags

    batches: Any
    if feature_type == "tile" and max_batch_tiles and num_workers == 0 and len(dataset) > 1:
        batches = _size_batches(dataset, max_batch_tiles)
    else:
        batches = DataLoader(
            dataset,
            batch_size=1 if feature_type == "tile" else 64,
            shuffle=False,
            collate_fn=collate_bags,
            num_workers=num_workers,
        )
    was_training = model.training
    model.eval()
    chunks: list[Any] = []
    order: list[int] = []
    with torch.inference_mode():
        for feats, coords, mask, idx in batches:
            order += [int(i) for i in idx]
            check_stop()
            use_mask = None if feats.shape[0] == 1 else mask.to(device)
            out = model(feats.to(device), coords.to(device), use_mask)
            if isinstance(out, (list, tuple)):
                chunks.append([o.detach().float().cpu() for o in out])
            else:
                chunks.append(out.detach().float().cpu())
    model.train(was_training)
    if not chunks:
        raise ValueError("no patients to predict")
    back = torch.as_tensor(np.argsort(order, kind="stable"))  # dataset order
    if isinstance(chunks[0], list):
        return [torch.cat([c[t] for c in chunks])[back] for t in range(len(chunks[0]))]
    return torch.cat(chunks)[back]


def _size_batches(dataset: Any, max_tiles: int) -> Any:
    """Collated batches of ``dataset``'s items sorted by bag size, ≤ ``max_tiles`` padded tiles each."""
    from stamp.modeling.data import collate_bags

    items = [dataset[i] for i in range(len(dataset))]
    items.sort(key=lambda item: (len(item[0]), int(item[3])))
    group: list[Any] = []
    for item in items:
        if group and len(item[0]) * (len(group) + 1) > max_tiles:
            yield collate_bags(group)
            group = []
        group.append(item)
    if group:
        yield collate_bags(group)


def to_outputs(codec: Any, raw: torch.Tensor | list[torch.Tensor], patient_ids: Sequence[str]) -> Outputs:
    """Turn raw model outputs into :class:`Outputs` (log-probabilities / units / risk)."""
    if codec.task == "classification":
        logits = codec.per_target(raw)
        values = {
            t: torch.log_softmax(lg.double(), dim=1).numpy()
            for t, lg in zip(codec.targets, logits, strict=True)
        }
    elif codec.task == "regression":
        assert isinstance(raw, torch.Tensor)
        pred = raw.double().reshape(-1).numpy() * (codec.target_std or 1.0) + (codec.target_mean or 0.0)
        values = {"pred": pred}
    else:
        assert isinstance(raw, torch.Tensor)
        values = {"risk": raw.double().reshape(-1).numpy()}
    return Outputs(list(patient_ids), values)
