"""Patient-level cross-validation (stamp-facts §2.7) with an inner validation split per fold.

``<output_dir>/splits.json`` = ``{"splits": [{"train_patients": [...], "test_patients": [...]}, ...]}``
is written once and reused: patients it names that the tables no longer have are an error, usable
patients it does not name are left out with a warning, and a different ``n_splits`` is an error.
Fold ``i`` is the folder ``split-<i>/`` (``model.ckpt``, ``training-metrics.csv``,
``patient-preds.csv`` and, ours, ``baseline-preds.csv``: the mean-pool baseline of
:mod:`stamp.modeling.baseline` fitted on the same training patients, same columns), built under a temp name and published with its provenance
(:mod:`stamp.provenance`): the features (by content) and targets of its patients, the split, the
model settings and the code. A finished fold is reused only when that provenance is this run's; a
fold whose test patients' data changed but whose training data did not keeps its checkpoint (the
checkpoint records its own training provenance) and only predicts again. Unlike STAMP since March
2026, the test fold is never used for early stopping or checkpoint choice: each fold's training
patients are split again (:func:`stamp.modeling.train.inner_split`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sklearn.model_selection import KFold, StratifiedKFold

from stamp.config_models import AdvancedConfig
from stamp.fileio import atomic_write_text, staging_dir
from stamp.modeling.baseline import BASELINE_PREDS_NAME, fit_baseline
from stamp.modeling.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    load_meta,
    modeling_code_version,
)
from stamp.modeling.losses import TargetCodec
from stamp.modeling.predictions import (
    PREDS_NAME,
    bag_dataset,
    forward_all,
    patient_preds_table,
    to_outputs,
    write_csv,
)
from stamp.modeling.provenance import fold_provenance, training_provenance
from stamp.modeling.train import (
    TRAINING_METRICS_NAME,
    has_target,
    inner_split,
    resolve_torch_device,
    stratify_label,
    train_model,
)
from stamp.provenance import Check, ForeignOutput, Verdict, check_folder, publish_folder

__all__ = [
    "SPLITS_NAME",
    "fold_concurrency",
    "baseline_preds",
    "Split",
    "FoldFailed",
    "check_fold",
    "fold_dir",
    "make_splits",
    "predict_patients",
    "prepare_splits",
    "run_crossval",
    "run_fold",
]

SPLITS_NAME = "splits.json"
Split = dict[str, list[str]]
_logger = logging.getLogger("stamp")


class FoldFailed(ValueError):
    """A fold that cannot run (e.g. its folder holds something we did not write); one line."""


def fold_dir(output_dir: Path, index: int) -> Path:
    """``<output_dir>/split-<index>``."""
    return Path(output_dir) / f"split-{index}"


def make_splits(cohort: Any, n_splits: int, seed: int | None) -> list[Split]:
    """``n_splits`` patient-level folds of the patients with a target, sorted by id.

    StratifiedKFold on the label (classification) or event status (survival), KFold for regression
    and multi-target classification; shuffled with ``random_state = seed`` (0 when None, like STAMP).
    """
    patients = sorted((p for p in cohort.patients if has_target(p, cohort)), key=lambda p: p.id)
    ids = [p.id for p in patients]
    if len(ids) < n_splits:
        raise ValueError(f"crossval.n_splits = {n_splits} but only {len(ids)} patients have a target")
    state = 0 if seed is None else seed
    multi = cohort.task == "classification" and len(cohort.targets) > 1
    stratified = cohort.task in ("classification", "survival") and not multi
    if stratified:
        strata = [stratify_label(p, cohort) for p in patients]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=state).split(ids, strata))
        except ValueError as exc:
            raise ValueError(
                f"cannot make {n_splits} stratified folds: {exc}; lower crossval.n_splits"
            ) from exc
        for w in caught:  # e.g. a class with fewer patients than folds
            _logger.warning("crossval splits: %s", w.message)
    else:
        folds = list(KFold(n_splits, shuffle=True, random_state=state).split(ids))
    return [
        {"train_patients": [ids[i] for i in train], "test_patients": [ids[i] for i in test]}
        for train, test in folds
    ]


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _read_splits(path: Path) -> list[Split]:
    try:
        data = json.loads(path.read_text())
        splits = data["splits"]
        return [
            {
                "train_patients": [str(x) for x in s["train_patients"]],
                "test_patients": [str(x) for x in s["test_patients"]],
            }
            for s in splits
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a valid splits file ({exc}); expected "
            '{"splits": [{"train_patients": [...], "test_patients": [...]}]}; delete it to make new splits'
        ) from exc


def prepare_splits(cohort: Any, output_dir: Path, n_splits: int, seed: int | None) -> list[Split]:
    """Read ``<output_dir>/splits.json`` or make and write it; check it against the cohort."""
    path = Path(output_dir) / SPLITS_NAME
    if not path.exists():
        splits = make_splits(cohort, n_splits, seed)
        _atomic_json(path, {"splits": splits})
        _logger.info("wrote %s (%d folds)", path, len(splits))
        return splits
    splits = _read_splits(path)
    _logger.info("reusing %s (%d folds)", path, len(splits))
    if len(splits) != n_splits:
        raise ValueError(
            f"{path} has {len(splits)} folds but crossval.n_splits is {n_splits}; set n_splits to "
            f"{len(splits)} to reuse these splits, or choose a new output_dir (or move {path.name} away) "
            "to make new ones"
        )
    usable = {p.id for p in cohort.patients if has_target(p, cohort)}
    named = {pid for s in splits for key in ("train_patients", "test_patients") for pid in s[key]}
    missing = sorted(named - usable)
    if missing:
        dropped = {pid: why for why, ids in (getattr(cohort, "dropped", None) or {}).items() for pid in ids}
        shown = ", ".join(f"{pid} ({dropped[pid]})" if pid in dropped else pid for pid in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(
            f"{path}: {len(missing)} patient(s) in the splits are not usable in the tables/features: "
            f"{shown}{more}; fix the tables or delete {path.name} to make new splits"
        )
    extra = sorted(usable - named)
    if extra:
        _logger.warning(
            "%s: %d usable patient(s) are in no split and are left out: %s%s",
            path,
            len(extra),
            ", ".join(extra[:10]),
            " ..." if len(extra) > 10 else "",
        )
    return splits


def predict_patients(
    checkpoint: Path,
    patients: Sequence[Any],
    *,
    patient_label: str = "PATIENT",
    accelerator: str | None = None,
    num_workers: int = 0,
) -> Any:
    """``patient-preds`` DataFrame of one checkpoint for ``patients`` (with their targets)."""
    device = resolve_torch_device(accelerator)
    model, meta = load_checkpoint(checkpoint, map_location=device)
    codec = TargetCodec.from_meta(meta)
    raw = forward_all(
        model,
        bag_dataset(patients, cache=num_workers == 0),
        feature_type=codec.feature_type,
        device=device,
        num_workers=num_workers,
    )
    out = to_outputs(codec, raw, [p.id for p in patients])
    return patient_preds_table(
        out,
        [p.target for p in patients],
        task=codec.task,
        targets=codec.targets,
        categories=codec.categories,
        patient_label=patient_label,
        cut_off=meta.get("survival_cut_off"),
    )


def baseline_preds(
    cohort: Any, train: Sequence[Any], test: Sequence[Any], *, patient_label: str, seed: int | None
) -> Any:
    """``baseline-preds.csv`` table: the mean-pool baseline fitted on ``train``, predicting ``test``.

    None for multi-target classification (the baseline is single-target) and when the training
    patients lack a class.
    """
    train = [p for p in train if has_target(p, cohort)]
    if cohort.task == "classification" and len(cohort.targets) > 1:
        return None
    try:
        model = fit_baseline(train, cohort, seed)
    except ValueError as exc:
        _logger.warning("no mean-pool baseline for this fold: %s", exc)
        return None
    codec_targets = list(cohort.targets)
    out = model.predict(test, codec_targets[0])
    return patient_preds_table(
        out,
        [p.target for p in test],
        task=cohort.task,
        targets=codec_targets,
        categories=cohort.categories,
        patient_label=patient_label,
        cut_off=model.survival_cut_off,
    )


def _reusable_checkpoint(checkpoint: Path, expected_key: str) -> bool:
    """Whether a fold's old checkpoint records the training provenance this fold would train with."""
    try:
        return load_meta(checkpoint).get("provenance") == expected_key
    except CheckpointError:
        return False


def run_fold(
    cohort: Any,
    split: Split,
    fold_dir: Path,
    advanced: AdvancedConfig,
    seed: int | None,
    *,
    patient_label: str = "PATIENT",
    log: logging.Logger | None = None,
) -> Path:
    """Train (or reuse) one fold's model and predict its test patients; return ``patient-preds.csv``.

    Idempotent: a fold folder whose provenance is this run's is returned as it is. A fold folder
    that we did not write raises :class:`FoldFailed` and is left alone.
    """
    log = log or _logger
    fold_dir = Path(fold_dir)
    preds = fold_dir / PREDS_NAME
    by_id = {p.id: p for p in cohort.patients}
    missing = [pid for key in ("train_patients", "test_patients") for pid in split[key] if pid not in by_id]
    if missing:
        raise ValueError(f"{fold_dir.name}: patients not in the cohort: {', '.join(missing[:10])}")
    train = [by_id[pid] for pid in split["train_patients"]]
    test = [by_id[pid] for pid in split["test_patients"]]
    leak = {p.id for p in train} & {p.id for p in test}
    if leak:
        raise ValueError(f"{fold_dir.name}: patients in both train and test: {sorted(leak)[:10]}")
    code = modeling_code_version()
    expected = fold_provenance(cohort, train, test, advanced, seed, patient_label=patient_label, code=code)
    check = check_folder(fold_dir, expected)
    if check.reusable:
        log.info("%s: finished with the same provenance; reusing it", fold_dir.name)
        return preds
    if check.verdict is Verdict.FOREIGN:
        raise FoldFailed(f"{fold_dir.name}: {check.reason}")
    if check.verdict is Verdict.STALE:
        log.info("%s: computing again (%s)", fold_dir.name, check.reason)
    model_key = training_provenance(cohort, train, advanced, seed, code=code).key
    old_checkpoint = fold_dir / CHECKPOINT_NAME
    with staging_dir(fold_dir) as staging:
        if check.verdict is Verdict.STALE and _reusable_checkpoint(old_checkpoint, model_key):
            log.info("%s: its training data did not change; reusing %s", fold_dir.name, old_checkpoint)
            for name in (CHECKPOINT_NAME, TRAINING_METRICS_NAME):
                if (fold_dir / name).is_file():
                    _link_or_copy(fold_dir / name, staging / name)
        else:
            inner_train, inner_valid = inner_split(train, cohort, seed)
            log.info(
                "%s: %d train / %d valid / %d test patients",
                fold_dir.name,
                len(inner_train),
                len(inner_valid),
                len(test),
            )
            train_model(
                inner_train,
                inner_valid,
                cohort,
                advanced=advanced,
                output_dir=staging,
                seed=seed,
                log=log,
                provenance=model_key,
            )
        from stamp.modeling.data import bag_store

        in_memory = bag_store().fits([p.feature_files for p in test])
        table = predict_patients(
            staging / CHECKPOINT_NAME,
            test,
            patient_label=patient_label,
            accelerator=advanced.accelerator,
            num_workers=0 if in_memory else advanced.num_workers,
        )
        write_csv(table, staging / PREDS_NAME)
        base = baseline_preds(cohort, train, test, patient_label=patient_label, seed=seed)
        if base is not None:
            write_csv(base, staging / BASELINE_PREDS_NAME)
        try:
            publish_folder(staging, fold_dir, expected)
        except ForeignOutput as exc:  # something appeared there meanwhile
            shutil.rmtree(staging, ignore_errors=True)
            raise FoldFailed(f"{fold_dir.name}: {exc}") from exc
    log.info("wrote %s", preds)
    return preds


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_fold(cohort: Any, split: Split, fold: Path, advanced: AdvancedConfig, patient_label: str) -> Check:
    """:class:`stamp.provenance.Check` of a fold folder against what this run would write."""
    by_id = {p.id: p for p in cohort.patients}
    train = [by_id[pid] for pid in split["train_patients"] if pid in by_id]
    test = [by_id[pid] for pid in split["test_patients"] if pid in by_id]
    expected = fold_provenance(
        cohort,
        train,
        test,
        advanced,
        advanced.seed,
        patient_label=patient_label,
        code=modeling_code_version(),
    )
    return check_folder(Path(fold), expected)


def run_crossval(
    cohort: Any,
    output_dir: Path,
    *,
    n_splits: int,
    advanced: AdvancedConfig,
    patient_label: str = "PATIENT",
    concurrency: int = 1,
) -> list[Path]:
    """All folds (the Prefect flow maps :func:`run_fold` instead); returns the preds paths.

    ``concurrency`` 1: one after the other in this process; more: that many at a time in worker
    processes (:mod:`stamp.modeling.parallel`).
    """
    splits = prepare_splits(cohort, Path(output_dir), n_splits, advanced.seed)
    args = [
        (cohort, split, fold_dir(Path(output_dir), i), advanced, advanced.seed)
        for i, split in enumerate(splits)
    ]
    if concurrency <= 1:
        return [run_fold(*a, patient_label=patient_label) for a in args]
    from concurrent.futures import ThreadPoolExecutor

    from stamp.modeling.parallel import run_fold_in_worker

    with ThreadPoolExecutor(concurrency) as threads:
        futures = [
            threads.submit(run_fold_in_worker, concurrency, *a, patient_label=patient_label) for a in args
        ]
        return [f.result() for f in futures]


def fold_concurrency(requested: int | None, advanced: AdvancedConfig, n_folds: int) -> int:
    """Folds to train at once: ``requested`` (``orchestration.task_concurrency``) when given, else
    on a CPU as many as there are cores (one torch thread each), on a GPU one; never more than folds."""
    from stamp.modeling.parallel import available_cores

    if requested is None:
        requested = 1 if resolve_torch_device(advanced.accelerator).type != "cpu" else available_cores()
    return max(1, min(int(requested), n_folds))
