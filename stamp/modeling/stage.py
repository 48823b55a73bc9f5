"""Glue between config sections and the modeling functions: cohorts and per-fold metrics.

Plain functions (no Prefect), so the Prefect tasks, a container entry point and tests all
build cohorts and summarise prediction files the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stamp.cohort import CohortData, load_cohort
from stamp.config_models import AdvancedConfig, DeploymentConfig, TrainingConfig
from stamp.escaping import csv_unguard_frame
from stamp.fileio import atomic_write_text, staging_dir
from stamp.modeling.checkpoint import CHECKPOINT_NAME, load_meta, modeling_code_version
from stamp.modeling.metrics import auroc, concordance_index, mae, pearson_r
from stamp.modeling.provenance import training_provenance
from stamp.modeling.train import TRAINING_METRICS_NAME, has_target, inner_split, train_model
from stamp.provenance import Check, Verdict, check_files, publish_files

_logger = logging.getLogger("stamp")
#: ours: the model's and the mean-pool baseline's figures on the inner validation patients
BASELINE_METRICS_NAME = "baseline-metrics.json"
TRAIN_OUTPUTS = (CHECKPOINT_NAME, TRAINING_METRICS_NAME, BASELINE_METRICS_NAME)


_COHORTS: OrderedDict[str, CohortData] = OrderedDict()
_COHORTS_LOCK = threading.Lock()


def _cohort_key(sec: TrainingConfig) -> str:
    """The section and the identity (path, size, mtime, inode) of its tables and feature files."""

    def ident(path: str | os.PathLike[str]) -> list[Any]:
        st = os.stat(path)
        return [os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]

    files = [ident(p) for p in (sec.clini_table, sec.slide_table) if p is not None]
    for folder, dirs, names in os.walk(sec.feature_dir):
        dirs.sort()
        files += [ident(os.path.join(folder, n)) for n in sorted(names) if n.endswith(".h5")]
    return json.dumps([sec.model_dump(mode="json", exclude={"output_dir"}), files], default=str)


def training_cohort(sec: TrainingConfig, *, reuse: bool = False) -> CohortData:
    """The patients of a ``training`` / ``crossval`` section, with their targets.

    ``reuse``: return the cohort this process loaded for the same section while none of its tables
    and feature files changed (a stat of each, not a read): the folds of one crossval load the
    cohort, and probe its h5 files, once. The cohort is shared; do not modify it.
    """
    if not reuse:
        return _load_training_cohort(sec)
    key = _cohort_key(sec)
    with _COHORTS_LOCK:
        cohort = _COHORTS.get(key)
        if cohort is not None:
            _COHORTS.move_to_end(key)
            return cohort
    cohort = _load_training_cohort(sec)
    with _COHORTS_LOCK:
        _COHORTS[key] = cohort
        while len(_COHORTS) > 4:
            _COHORTS.popitem(last=False)
    return cohort


def _load_training_cohort(sec: TrainingConfig) -> CohortData:
    return load_cohort(
        task=sec.task,
        clini_table=sec.clini_table,
        slide_table=sec.slide_table,
        feature_dir=sec.feature_dir,
        ground_truth_label=sec.ground_truth_label,
        categories=sec.categories,
        time_label=sec.time_label,
        status_label=sec.status_label,
        patient_label=sec.patient_label,
        filename_label=sec.filename_label,
        drop_patients_with_missing_ground_truth=sec.drop_patients_with_missing_ground_truth,
    )


def deployment_cohort(sec: DeploymentConfig, spec: Mapping[str, Any]) -> CohortData:
    """The patients of a ``deployment`` section; task, labels and categories come from the checkpoints."""
    gt = sec.ground_truth_label or spec.get("ground_truth_label")
    return load_cohort(
        task=spec["task"],
        clini_table=sec.clini_table,
        slide_table=sec.slide_table,
        feature_dir=sec.feature_dir,
        ground_truth_label=gt if sec.clini_table else None,
        categories=spec.get("categories") or None,
        time_label=sec.time_label or spec.get("time_label"),
        status_label=sec.status_label or spec.get("status_label"),
        patient_label=sec.patient_label,
        filename_label=sec.filename_label,
        drop_patients_with_missing_ground_truth=sec.drop_patients_with_missing_ground_truth,
        require_targets=False,
    )


def check_training(cohort: CohortData, advanced: AdvancedConfig, output_dir: Path) -> Check:
    """:class:`stamp.provenance.Check` of ``model.ckpt`` + training metrics in ``output_dir``."""
    train = [p for p in cohort.patients if has_target(p, cohort)]
    expected = training_provenance(cohort, train, advanced, advanced.seed, code=modeling_code_version())
    return check_files(Path(output_dir), CHECKPOINT_NAME, TRAIN_OUTPUTS, expected)


def run_training(cohort: CohortData, advanced: AdvancedConfig, output_dir: Path) -> dict[str, Any]:
    """``stamp train``: one model on every patient with a target (inner split for early stopping).

    Reuses ``model.ckpt`` when its provenance is this run's; never replaces one we did not write.
    Returns the checkpoint path and the patient counts.
    """
    output_dir = Path(output_dir)
    patients = [p for p in cohort.patients if has_target(p, cohort)]
    train, valid = inner_split(patients, cohort, advanced.seed)
    counts = {"train_patients": len(train), "valid_patients": len(valid)}
    expected = training_provenance(cohort, patients, advanced, advanced.seed, code=modeling_code_version())
    check = check_files(output_dir, CHECKPOINT_NAME, TRAIN_OUTPUTS, expected)
    if check.reusable:
        _logger.info("%s: trained with the same provenance; reusing it", output_dir / CHECKPOINT_NAME)
        return {"checkpoint": str(output_dir / CHECKPOINT_NAME), **counts}
    check.raise_if_foreign()
    if check.verdict is Verdict.STALE:
        _logger.info("%s: training again (%s)", output_dir / CHECKPOINT_NAME, check.reason)
    with staging_dir(output_dir / CHECKPOINT_NAME) as staging:
        train_model(
            train,
            valid,
            cohort,
            advanced=advanced,
            output_dir=staging,
            seed=advanced.seed,
            provenance=expected.key,
        )
        comparison = validation_baseline(cohort, train, valid, staging, advanced.seed)
        atomic_write_text(staging / BASELINE_METRICS_NAME, json.dumps(comparison, indent=2) + "\n")
        publish_files(output_dir, CHECKPOINT_NAME, {n: staging / n for n in TRAIN_OUTPUTS}, expected)
        shutil.rmtree(staging, ignore_errors=True)
    return {"checkpoint": str(output_dir / CHECKPOINT_NAME), **counts, **_read_comparison(output_dir)}


def _read_comparison(output_dir: Path) -> dict[str, Any]:
    try:
        return {"baseline": json.loads((output_dir / BASELINE_METRICS_NAME).read_text())}
    except (OSError, ValueError):
        return {}


def validation_baseline(
    cohort: CohortData, train: Sequence[Any], valid: Sequence[Any], model_dir: Path, seed: int | None
) -> dict[str, Any]:
    """The model's figure on the inner validation patients (at its saved epoch, from
    ``training-metrics.csv``) beside the mean-pool baseline fitted on the same training patients.

    The model's epoch was chosen on these patients, so its figure is optimistic; the baseline's is not.
    """
    from stamp.modeling.baseline import BASELINE_NAME
    from stamp.modeling.crossval import baseline_preds
    from stamp.modeling.predictions import write_csv

    out: dict[str, Any] = {"valid_patients": len(valid), "model": {}, BASELINE_NAME: {}}
    metrics = pd.read_csv(Path(model_dir) / TRAINING_METRICS_NAME)
    meta = load_meta(Path(model_dir) / CHECKPOINT_NAME)
    row = metrics[metrics["epoch"] == meta["best_epoch"] - 1]
    key = {"classification": "valid_auroc", "regression": "valid_pearson", "survival": "valid_cindex"}
    name = {"classification": "auroc", "regression": "pearson_r", "survival": "c_index"}[cohort.task]
    out["model_name"] = meta.get("model_name")
    if not row.empty and key[cohort.task] in row:
        out["model"][name] = _round(float(row[key[cohort.task]].iloc[0]))
    if not valid:
        return out
    table = baseline_preds(cohort, train, valid, patient_label="PATIENT", seed=seed)
    if table is None:
        return out
    tmp = Path(model_dir) / ".baseline-valid.csv"
    write_csv(table, tmp)
    try:
        figures = preds_metrics(tmp, cohort)
    finally:
        tmp.unlink(missing_ok=True)
    target = f"auroc_{cohort.targets[0]}" if cohort.task == "classification" else name
    out[BASELINE_NAME][name] = figures.get(target)
    return out


def _round(value: float) -> float:
    return value if math.isnan(value) else round(value, 4)


def table_files(sec: TrainingConfig | DeploymentConfig) -> list[str]:
    """The clinical / slide tables a section reads (their content goes into cache keys)."""
    return [str(p) for p in (sec.clini_table, sec.slide_table) if p is not None]


def _num(series: pd.Series) -> np.ndarray:
    return np.asarray(pd.to_numeric(series, errors="coerce"), dtype=np.float64)


def fold_metrics(preds_csv: Path, cohort: CohortData) -> dict[str, float]:
    """:func:`preds_metrics` of a fold's ``patient-preds.csv`` and, prefixed ``baseline_``, of the
    ``baseline-preds.csv`` beside it (when there is one)."""
    from stamp.modeling.baseline import BASELINE_PREDS_NAME

    out = preds_metrics(preds_csv, cohort)
    base = Path(preds_csv).parent / BASELINE_PREDS_NAME
    if base.is_file():
        out.update({f"baseline_{k}": v for k, v in preds_metrics(base, cohort).items() if k != "patients"})
    return out


def baseline_comparison(rows: Sequence[Mapping[str, Any]], model_name: str) -> tuple[list[str], list[str]]:
    """Lines ``"<model> 0.93 [0.88–0.98] vs mean-pool baseline 0.95 [..] (<metric>)"`` per metric
    that has a ``baseline_<metric>`` over the fold ``rows``, and warnings where the model's mean is
    below the baseline's by more than the half-width of the model's 95 % interval (for ``mae``,
    lower is better: above it)."""
    from stamp.modeling.baseline import BASELINE_NAME

    lines: list[str] = []
    warnings: list[str] = []
    keys = [k for k in (rows[0] if rows else {}) if f"baseline_{k}" in rows[0]]
    for key in keys:
        mean, lo, hi = mean_ci([_float(r.get(key)) for r in rows], key=key)
        bmean, blo, bhi = mean_ci([_float(r.get(f"baseline_{key}")) for r in rows], key=key)
        lines.append(
            f"{key}: {model_name} {_fmt(mean)} [{_fmt(lo)}–{_fmt(hi)}] vs {BASELINE_NAME} "
            f"{_fmt(bmean)} [{_fmt(blo)}–{_fmt(bhi)}]"
        )
        half = (hi - lo) / 2 if not math.isnan(hi - lo) else 0.0
        worse = (mean - bmean > half) if key == "mae" else (bmean - mean > half)
        if worse and not (math.isnan(mean) or math.isnan(bmean)):
            warnings.append(
                f"{model_name} is worse than the {BASELINE_NAME} on {key} by more than its 95% CI "
                f"({_fmt(mean)} [{_fmt(lo)}–{_fmt(hi)}] vs {_fmt(bmean)}): with this cohort and these "
                "settings the MIL model does not learn more than mean-pooled features show"
            )
    return lines, warnings


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}"


def preds_metrics(preds_csv: Path, cohort: CohortData) -> dict[str, float]:
    """Summary metrics of one ``patient-preds.csv``: AUROC per target, or Pearson r + MAE, or C-index."""
    df = csv_unguard_frame(pd.read_csv(preds_csv, dtype=str, keep_default_na=False, na_values=[""]))
    out: dict[str, float] = {"patients": float(len(df))}
    if cohort.task == "classification":
        for target in cohort.targets:
            cats = cohort.categories[target]
            truth = df[target] if target in df else pd.Series([None] * len(df))
            y = np.array([cats.index(v) if v in cats else -1 for v in truth], dtype=np.int64)
            probs = np.stack([_num(df[f"{target}_{c}"]) for c in cats], axis=1)
            out[f"auroc_{target}"] = auroc(y, probs)
    elif cohort.task == "regression":
        target = cohort.targets[0]
        out["pearson_r"] = pearson_r(_num(df[target]), _num(df["pred"]))
        out["mae"] = mae(_num(df[target]), _num(df["pred"]))
    else:
        time_col, status_col = cohort.targets
        out["c_index"] = concordance_index(_num(df[time_col]), _num(df["pred_score"]), _num(df[status_col]))
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in out.items()}


def metric_bounds(key: str) -> tuple[float, float] | None:
    """The range of a fold metric (``auroc_<target>``, ``c_index``, ``pearson_r``, ``mae``...) or None."""
    if key.startswith(("auroc", "auprc", "c_index")):
        return (0.0, 1.0)
    if key.startswith("pearson_r"):
        return (-1.0, 1.0)
    if key.startswith("mae"):
        return (0.0, math.inf)
    return None


def mean_ci(values: list[float], confidence: float = 0.95, key: str = "") -> tuple[float, float, float]:
    """Mean and Student-t interval over folds: the statistics stage's :func:`t_interval` (clipped to the
    range of metric ``key``), so crossval and statistics print the same interval for the same folds."""
    from stamp.statistics.bootstrap import t_interval

    return t_interval(values, confidence, bounds=metric_bounds(key))
