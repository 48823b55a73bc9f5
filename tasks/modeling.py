"""Prefect tasks for train / crossval folds / deploy (DESIGN contract 4 cache keys).

A fold's key = sha256 of every feature file of its patients and of the tables + the split +
the section and advanced settings + the modeling code version. Tasks return paths and small
metric dicts (JSON results), never tensors. The task bodies call the library's stage functions,
which reuse or replace outputs by their provenance (:mod:`stamp.provenance`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from stamp.config_models import AdvancedConfig, CrossvalConfig, DeploymentConfig, TrainingConfig
from stamp.modeling.checkpoint import CHECKPOINT_NAME, modeling_code_version
from stamp.modeling.crossval import run_fold
from stamp.modeling.deploy import deploy, deployment_spec
from stamp.modeling.stage import (
    deployment_cohort,
    fold_metrics,
    preds_metrics,
    run_training,
    training_cohort,
)
from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import RESULT_OPTIONS

MODELING_CODE_VERSION = modeling_code_version()
MODELING_CACHE = content_cache_policy(
    MODELING_CODE_VERSION, content_args=("feature_files", "tables"), ignore_args=("run", "concurrency")
)
DEPLOY_CACHE = content_cache_policy(
    MODELING_CODE_VERSION, content_args=("feature_files", "tables", "checkpoints"), ignore_args=("run",)
)


@task(name="crossval-fold", cache_policy=MODELING_CACHE, **RESULT_OPTIONS)
def crossval_fold(
    index: int,
    split: dict[str, list[str]],
    feature_files: list[str],
    tables: list[str],
    section: dict[str, Any],
    advanced: dict[str, Any],
    fold_dir: str,
    run: dict[str, Any] | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    """Train fold ``index`` on its training patients (inner validation split), predict its test patients.

    The metrics include the mean-pool baseline's (``baseline_<metric>``). The cohort is loaded once
    per process for all folds (while its tables and feature files are unchanged). ``concurrency`` > 1:
    the fold trains in a worker process of a pool of that size (:mod:`stamp.modeling.parallel`).
    """
    sec = CrossvalConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    cohort = training_cohort(sec, reuse=True)
    if concurrency > 1:
        from stamp.modeling.parallel import run_fold_in_worker

        preds = run_fold_in_worker(
            concurrency, cohort, split, Path(fold_dir), adv, adv.seed, patient_label=sec.patient_label
        )
    else:
        preds = run_fold(cohort, split, Path(fold_dir), adv, adv.seed, patient_label=sec.patient_label)
    return {
        "fold": index,
        "preds": str(preds),
        "checkpoint": str(Path(fold_dir) / CHECKPOINT_NAME),
        "test_patients": len(split["test_patients"]),
        **fold_metrics(preds, cohort),
    }


@task(name="train-model", cache_policy=MODELING_CACHE, **RESULT_OPTIONS)
def train_all(
    feature_files: list[str],
    tables: list[str],
    section: dict[str, Any],
    advanced: dict[str, Any],
    output_dir: str,
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model on all patients of a ``training`` section (inner split for early stopping)."""
    sec = TrainingConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    return run_training(training_cohort(sec, reuse=True), adv, Path(output_dir))


@task(name="deploy-models", cache_policy=DEPLOY_CACHE, **RESULT_OPTIONS)
def deploy_models(
    checkpoints: list[str],
    feature_files: list[str],
    tables: list[str],
    section: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict the deployment cohort with every checkpoint (and their ensemble); return the files."""
    sec = DeploymentConfig.model_validate(section)
    paths = [Path(c) for c in checkpoints]
    cohort = deployment_cohort(sec, deployment_spec(paths))
    files = deploy(
        paths,
        cohort,
        Path(sec.output_dir),
        patient_label=sec.patient_label,
        accelerator=sec.accelerator,
        num_workers=0,
    )
    result: dict[str, Any] = {"files": [str(f) for f in files], "patients": len(cohort.patients)}
    if sec.clini_table is not None:
        result.update(preds_metrics(files[-1], cohort))
    return result
