"""``stamp train`` / ``crossval`` / ``deploy`` as Prefect flows; crossval maps one task per fold."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from stamp.cohort import CohortData
from stamp.config_models import AdvancedConfig, CrossvalConfig, DeploymentConfig, TrainingConfig
from stamp.logs import logger
from stamp.modeling.crossval import fold_dir, prepare_splits
from stamp.modeling.deploy import deployment_spec
from stamp.modeling.stage import deployment_cohort, mean_ci, table_files, training_cohort
from stamp_tasks.cache import missing_outputs
from stamp_tasks.modeling import crossval_fold, deploy_models, fold_outputs, train_all


def _pool(n: int) -> TaskRunner[PrefectFuture[Any]]:
    return cast(TaskRunner[PrefectFuture[Any]], ThreadPoolTaskRunner(max_workers=n))


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


@flow(name="crossval", task_runner=_pool(1))
def crossval_flow(section: dict[str, Any], advanced: dict[str, Any]) -> dict[str, Any]:
    """Patient-level k-fold cross-validation: splits.json once, then one cached task per fold."""
    start = time.perf_counter()
    sec = CrossvalConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    warn_unused(sec)
    cohort = training_cohort(sec)
    out = Path(sec.output_dir)
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
        row = fut.result()
        if missing_outputs(row, fold_outputs):  # cached result whose files were deleted
            row = submit(i, refresh=True).result()
        logger.info("fold %d: %s", i, {k: v for k, v in row.items() if k not in ("preds", "checkpoint")})
        rows.append(row)
    table, summary = crossval_report(rows)
    create_table_artifact(key="crossval-folds", table=table, description=f"crossval in {out}")
    create_markdown_artifact(key="crossval-summary", markdown=summary)
    return {"output_dir": str(out), "folds": rows, "summary": summary, "seconds": time.perf_counter() - start}


@flow(name="train", task_runner=_pool(1))
def train_flow(section: dict[str, Any], advanced: dict[str, Any]) -> dict[str, Any]:
    """Train one model on all usable patients (early stopping on an inner validation split)."""
    sec = TrainingConfig.model_validate(section)
    warn_unused(sec)
    cohort = training_cohort(sec)
    result = train_all.submit(feature_files(cohort), table_files(sec), section, advanced, str(sec.output_dir))
    value = result.result()
    if missing_outputs(value, lambda r: [r["checkpoint"]]):
        value = (
            train_all.with_options(refresh_cache=True)
            .submit(feature_files(cohort), table_files(sec), section, advanced, str(sec.output_dir))
            .result()
        )
    create_markdown_artifact(
        key="train-summary", markdown=f"# train\n\ncheckpoint: `{value['checkpoint']}`\n"
    )
    return value


@flow(name="deploy", task_runner=_pool(1))
def deploy_flow(section: dict[str, Any]) -> dict[str, Any]:
    """Predict a deployment cohort with one or more checkpoints (+ ensemble)."""
    sec = DeploymentConfig.model_validate(section)
    checkpoints = [str(p) for p in sec.checkpoint_paths]
    cohort = deployment_cohort(sec, deployment_spec([Path(c) for c in checkpoints]))
    args = (checkpoints, feature_files(cohort), table_files(sec), section)
    value = deploy_models.submit(*args).result()
    if missing_outputs(value, lambda r: r["files"]):
        value = deploy_models.with_options(refresh_cache=True).submit(*args).result()
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
