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
from stamp.modeling.crossval import check_fold, fold_concurrency, fold_dir, prepare_splits
from stamp.modeling.deploy import check_deployment, deployment_spec
from stamp.modeling.stage import (
    baseline_comparison,
    check_training,
    deployment_cohort,
    mean_ci,
    table_files,
    training_cohort,
)
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.modeling import crossval_fold, deploy_models, train_all

MAX_FOLDS_AT_ONCE = 32


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
    return [k for k in rows[0] if k not in skip and not k.startswith("baseline_")] if rows else []


def model_label(cohort: CohortData, adv: AdvancedConfig) -> str:
    """The model's name as configured, or STAMP's default for the cohort's features."""
    from stamp.modeling.models.registry import default_model_name

    return adv.model_name or default_model_name(cohort.feature_type, cohort.multi_target)


def crossval_report(rows: list[dict[str, Any]], model: str = "model") -> tuple[list[dict[str, Any]], str]:
    """Per-fold table rows and a markdown summary with mean and 95 % t-interval per metric, the
    mean-pool baseline's beside it (``baseline_<metric>`` in the rows), and a warning line where
    the model is worse than the baseline by more than its interval."""
    table = [{k: v for k, v in r.items() if k not in ("preds", "checkpoint")} for r in rows]
    has_base = bool(rows) and any(f"baseline_{k}" in rows[0] for k in _metric_keys(rows))
    head = (
        "| metric | mean | 95% CI | mean-pool baseline | 95% CI |"
        if has_base
        else "| metric | mean | 95% CI |"
    )
    lines = ["# crossval", "", head, "|---" * (5 if has_base else 3) + "|"]
    for key in _metric_keys(rows):
        mean, lo, hi = mean_ci([float(r[key]) for r in rows], key=key)
        line = f"| {key} | {mean:.3f} | {lo:.3f} – {hi:.3f} |"
        if has_base:
            if f"baseline_{key}" in rows[0]:
                bmean, blo, bhi = mean_ci([float(r[f"baseline_{key}"]) for r in rows], key=key)
                line += f" {bmean:.3f} | {blo:.3f} – {bhi:.3f} |"
            else:
                line += " | |"
        lines.append(line)
    compared, warnings = baseline_comparison(rows, model)
    if compared:
        lines += ["", *(f"- {c}" for c in compared)]
    lines += [f"- **warning**: {w}" for w in warnings]
    return table, "\n".join(lines) + "\n"


@flow(name="crossval", task_runner=thread_pool(MAX_FOLDS_AT_ONCE))
def crossval_flow(
    section: dict[str, Any], advanced: dict[str, Any], task_concurrency: int | None = None
) -> dict[str, Any]:
    """Patient-level k-fold cross-validation: splits.json once, then one cached task per fold.

    ``task_concurrency`` (``orchestration.task_concurrency``): folds trained at once, each in its
    own worker process; None: as many as CPU cores (one on a GPU). 1: one after the other in
    this process.
    """
    start = time.perf_counter()
    sec = CrossvalConfig.model_validate(section)
    adv = AdvancedConfig.model_validate(advanced)
    warn_unused(sec)
    cohort = training_cohort(sec, reuse=True)  # the fold tasks of this process reuse it
    out = Path(sec.output_dir)
    sweep_temps(out)  # what a killed run left behind
    splits = prepare_splits(cohort, out, sec.n_splits, adv.seed)
    tables = table_files(sec)
    at_once = min(fold_concurrency(task_concurrency, adv, len(splits)), MAX_FOLDS_AT_ONCE)
    if at_once > 1:
        logger.info("crossval: %d folds at a time, each in a worker process", at_once)

    def submit(i: int, refresh: bool = False) -> PrefectFuture[Any]:
        split = splits[i]
        files = feature_files(cohort, split["train_patients"] + split["test_patients"])
        task = crossval_fold.with_options(task_run_name=f"fold-{i}", refresh_cache=refresh)
        return task.submit(
            i, split, files, tables, section, advanced, str(fold_dir(out, i)), concurrency=at_once
        )

    # a window of `at_once` folds in flight (1: in this process, strictly one after the other)
    futures = {i: submit(i) for i in range(min(at_once, len(splits)))}
    rows = []
    for i in range(len(splits)):
        fut = futures.pop(i)
        row = served_or_recomputed(
            fut,
            lambda _r, i=i: check_fold(cohort, splits[i], fold_dir(out, i), adv, sec.patient_label),
            lambda i=i: submit(i, refresh=True),
        )
        logger.info("fold %d: %s", i, {k: v for k, v in row.items() if k not in ("preds", "checkpoint")})
        rows.append(row)
        if i + at_once < len(splits):
            futures[i + at_once] = submit(i + at_once)
    name = model_label(cohort, adv)
    table, summary = crossval_report(rows, name)
    for line in baseline_comparison(rows, name)[0]:
        logger.info("crossval %s", line)
    for warning in baseline_comparison(rows, name)[1]:
        logger.warning("crossval: %s", warning)
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
    markdown = f"# train\n\ncheckpoint: `{value['checkpoint']}`\n"
    line = train_baseline_line(value.get("baseline"))
    if line:
        logger.info("train: %s", line)
        markdown += f"\n{line}\n"
    create_markdown_artifact(key="train-summary", markdown=markdown)
    return value


def train_baseline_line(comparison: dict[str, Any] | None) -> str | None:
    """``"on the 12 inner-validation patients: vit auroc 0.91 vs mean-pool baseline 0.95"``."""
    if not comparison:
        return None
    from stamp.modeling.baseline import BASELINE_NAME

    model, base = comparison.get("model") or {}, comparison.get(BASELINE_NAME) or {}
    parts = [
        f"{comparison.get('model_name') or 'model'} {k} {v:.3f} vs {BASELINE_NAME} {base[k]:.3f}"
        for k, v in model.items()
        if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float))
    ]
    if not parts:
        return None
    return (
        f"on the {comparison.get('valid_patients')} inner-validation patients: "
        + "; ".join(parts)
        + " (the model's epoch was chosen on them)"
    )


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


def run_crossval_flow(
    sec: CrossvalConfig, advanced: AdvancedConfig | None = None, task_concurrency: int | None = 1
) -> dict[str, Any]:
    """Run :func:`crossval_flow` (default: folds one at a time in this process)."""
    adv = advanced or AdvancedConfig()
    return crossval_flow(
        section=sec.model_dump(mode="json"),
        advanced=adv.model_dump(mode="json"),
        task_concurrency=task_concurrency,
    )
