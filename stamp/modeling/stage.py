"""Glue between config sections and the modeling functions: cohorts and per-fold metrics.

Plain functions (no Prefect), so the Prefect tasks, a container entry point and tests all
build cohorts and summarise prediction files the same way.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stamp.cohort import CohortData, load_cohort
from stamp.config_models import AdvancedConfig, DeploymentConfig, TrainingConfig
from stamp.escaping import csv_unguard_frame
from stamp.fileio import staging_dir
from stamp.modeling.checkpoint import CHECKPOINT_NAME, modeling_code_version
from stamp.modeling.metrics import auroc, concordance_index, mae, pearson_r
from stamp.modeling.provenance import training_provenance
from stamp.modeling.train import TRAINING_METRICS_NAME, has_target, inner_split, train_model
from stamp.provenance import Check, Verdict, check_files, publish_files

_logger = logging.getLogger("stamp")
TRAIN_OUTPUTS = (CHECKPOINT_NAME, TRAINING_METRICS_NAME)


def training_cohort(sec: TrainingConfig) -> CohortData:
    """The patients of a ``training`` / ``crossval`` section, with their targets."""
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
        publish_files(output_dir, CHECKPOINT_NAME, {n: staging / n for n in TRAIN_OUTPUTS}, expected)
        shutil.rmtree(staging, ignore_errors=True)
    return {"checkpoint": str(output_dir / CHECKPOINT_NAME), **counts}


def table_files(sec: TrainingConfig | DeploymentConfig) -> list[str]:
    """The clinical / slide tables a section reads (their content goes into cache keys)."""
    return [str(p) for p in (sec.clini_table, sec.slide_table) if p is not None]


def _num(series: pd.Series) -> np.ndarray:
    return np.asarray(pd.to_numeric(series, errors="coerce"), dtype=np.float64)


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


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval over folds (nan-safe; (mean, lo, hi))."""
    from scipy import stats

    arr = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(arr) == 0:
        return math.nan, math.nan, math.nan
    if len(arr) == 1:
        return float(arr[0]), math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return float(arr.mean()), float(arr.mean() - half), float(arr.mean() + half)
