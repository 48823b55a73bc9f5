"""``stamp train`` / ``crossval`` / ``deploy`` as Prefect flows; crossval maps one task per fold."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from stamp.cohort import CohortData
from stamp.config_models import AdvancedConfig, CrossvalConfig, DeploymentConfig, TrainingConfig
from stamp.fileio import sweep_temps
from stamp.logs import logger
from stamp.modeling.crossval import check_fold, fold_dir, prepare_splits
from stamp.modeling.deploy import check_deployment, deployment_spec
from stamp.modeling.stage import check_training, deployment_cohort, mean_ci, table_files, training_cohort
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.modeling import crossval_fold, deploy_models, train_all


def warn_unused(sec: TrainingConfig) -> None:
    """STAMP keys we accept for compatibility but do not act on."""
    if sec.use_vary_precision_transform:
        logger.warning("use_vary_precision_transform is accepted for STAMP compatibility but not implemented")
    if sec.params_path is not None:
        logger.warning("params_path is ignored (STAMP declares it but never uses it either)")


def feature_files(cohort: CohortData, patient_ids: list[str] | None = None) -> list[str]:
    """Sorted feature files of the cohort's patients (or of ``patient_ids``)."""
    wanted = set(patient_ids) if patient_ids is not None else None
    return sorted(
        str(f) for p in cohort.patients if wanted is None or p.id in wanted for f in p.feature_files
    )


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    skip = {"fold", "preds", "checkpoint", "test_patients", "patients"}
    return [k for k in rows[0] if k not in skip] if rows else []


def crossval_report(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Per-fold table rows and a markdown summary with mean and 95 % t-interval per metric."""
    table = [{k: v for k, v in r.items() if k not in ("preds", "checkpoint")} for r in rows]
    lines = ["# crossval", "", "| metric | mean | 95% CI |", "|---|---|---|"]
    for key in _metric_keys(rows):
        mean, lo, hi = mean_ci([float(r[key]) for r in rows])
        lines.append(f"| {key} | {mean:.3f} | {lo:.3f} – {hi:.3f} |")
    return table, "\n".join(lines) + "\n"


@flow(name="crossval", task_runner=thread_pool(1))
def crossval_flow(section: dict[str, Any], advanced: dict[str, Any]) -> dict[str, Any]:
    """Patient-level k-fold cross-validation: splits.json once, then one cached task per fold."""
    start = time.perf_counter()
    sec = CrossvalConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    warn_unused(sec)
    cohort = training_cohort(sec)
    out = Path(sec.output_dir)
    sweep_temps(out)  # what a killed run left behind
    splits = prepare_splits(cohort, out, sec.n_splits, adv.seed)
    tables = table_files(sec)

    def submit(i: int, refresh: bool = False) -> PrefectFuture[Any]:
        split = splits[i]
        files = feature_files(cohort, split["train_patients"] + split["test_patients"])
        task = crossval_fold.with_options(task_run_name=f"fold-{i}", refresh_cache=refresh)
        return task.submit(i, split, files, tables, section, advanced, str(fold_dir(out, i)))

    futures = [submit(i) for i in range(len(splits))]
    rows = []
    for i, fut in enumerate(futures):
        row = served_or_recomputed(
            fut,
            lambda _r, i=i: check_fold(cohort, splits[i], fold_dir(out, i), adv, sec.patient_label),
            lambda i=i: submit(i, refresh=True),
        )
        logger.info("fold %d: %s", i, {k: v for k, v in row.items() if k not in ("preds", "checkpoint")})
        rows.append(row)
    table, summary = crossval_report(rows)
    create_table_artifact(key="crossval-folds", table=table, description=f"crossval in {out}")
    create_markdown_artifact(key="crossval-summary", markdown=summary)
    return {"output_dir": str(out), "folds": rows, "summary": summary, "seconds": time.perf_counter() - start}


@flow(name="train", task_runner=thread_pool(1))
def train_flow(section: dict[str, Any], advanced: dict[str, Any]) -> dict[str, Any]:
    """Train one model on all usable patients (early stopping on an inner validation split)."""
    sec = TrainingConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    warn_unused(sec)
    cohort = training_cohort(sec)
    out = Path(sec.output_dir)
    sweep_temps(out, recursive=False)
    args = (feature_files(cohort), table_files(sec), section, advanced, str(out))
    value = served_or_recomputed(
        train_all.submit(*args),
        lambda _r: check_training(cohort, adv, out),
        lambda: train_all.with_options(refresh_cache=True).submit(*args),
    )
    create_markdown_artifact(
        key="train-summary", markdown=f"# train\n\ncheckpoint: `{value['checkpoint']}`\n"
    )
    return value


@flow(name="deploy", task_runner=thread_pool(1))
def deploy_flow(section: dict[str, Any]) -> dict[str, Any]:
    """Predict a deployment cohort with one or more checkpoints (+ ensemble)."""
    sec = DeploymentConfig.model_validate(section)
    checkpoints = [str(p) for p in sec.checkpoint_paths]
    cohort = deployment_cohort(sec, deployment_spec([Path(c) for c in checkpoints]))
    out = Path(sec.output_dir)
    sweep_temps(out, recursive=False)
    args = (checkpoints, feature_files(cohort), table_files(sec), section)
    value = served_or_recomputed(
        deploy_models.submit(*args),
        lambda _r: check_deployment(
            [Path(c) for c in checkpoints], cohort, out, patient_label=sec.patient_label
        ),
        lambda: deploy_models.with_options(refresh_cache=True).submit(*args),
    )
    shown = {k: v for k, v in value.items() if k != "files"}
    create_markdown_artifact(
        key="deploy-summary",
        markdown="# deploy\n\n" + "\n".join(f"- `{f}`" for f in value["files"]) + f"\n\n{shown}\n",
    )
    return value


def run_crossval_flow(sec: CrossvalConfig, advanced: AdvancedConfig | None = None) -> dict[str, Any]:
    """Run :func:`crossval_flow` (folds one at a time: training sets global torch state)."""
    adv = advanced or AdvancedConfig()
    return crossval_flow(section=sec.model_dump(mode="json"), advanced=adv.model_dump(mode="json"))
