"""Patient-level cross-validation (stamp-facts §2.7) with an inner validation split per fold.

``<output_dir>/splits.json`` = ``{"splits": [{"train_patients": [...], "test_patients": [...]}, ...]}``
is written once and reused: patients it names that the tables no longer have are an error, usable
patients it does not name are left out with a warning. Fold ``i`` writes ``split-<i>/model.ckpt``
and ``split-<i>/patient-preds.csv``; a fold whose ``patient-preds.csv`` exists is skipped, and an
existing ``model.ckpt`` trained on the fold's patients is reused. Unlike STAMP since March 2026, the
test fold is never used for early stopping or checkpoint choice: each fold's training patients are
split again (:func:`stamp.modeling.train.inner_split`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sklearn.model_selection import KFold, StratifiedKFold

from stamp.config_models import AdvancedConfig
from stamp.fileio import atomic_write_text
from stamp.modeling.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_meta
from stamp.modeling.losses import TargetCodec
from stamp.modeling.predictions import (
    PREDS_NAME,
    bag_dataset,
    forward_all,
    patient_preds_table,
    to_outputs,
    write_csv,
)
from stamp.modeling.train import has_target, inner_split, resolve_torch_device, stratify_label, train_model

__all__ = [
    "SPLITS_NAME",
    "Split",
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
        _logger.warning(
            "%s has %d folds but crossval.n_splits is %d; using the file", path, len(splits), n_splits
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
        bag_dataset(patients, cache=False),
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


_RUNTIME_KEYS = ("num_workers", "accelerator")


def _reusable(checkpoint: Path, train_ids: set[str], advanced: AdvancedConfig) -> bool:
    """Whether an existing fold checkpoint was trained on this fold's patients with these settings."""
    try:
        meta = load_meta(checkpoint)
    except CheckpointError as exc:
        _logger.warning("%s; training again", exc)
        return False
    used = set(meta.get("train_patients", [])) | set(meta.get("valid_patients", []))
    if not used <= train_ids:
        _logger.warning(
            "%s was trained on patients outside this fold's training set; training again", checkpoint
        )
        return False
    then = {k: v for k, v in (meta.get("advanced_config") or {}).items() if k not in _RUNTIME_KEYS}
    now = {k: v for k, v in advanced.model_dump(mode="json").items() if k not in _RUNTIME_KEYS}
    if then != now:
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        _logger.warning(
            "%s was trained with other advanced_config (%s); training again", checkpoint, ", ".join(changed)
        )
        return False
    return True


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

    Idempotent: a fold whose ``patient-preds.csv`` exists is returned as is.
    """
    log = log or _logger
    fold_dir = Path(fold_dir)
    preds = fold_dir / PREDS_NAME
    if preds.exists():
        log.info("%s exists; fold already finished, skipping", preds)
        return preds
    by_id = {p.id: p for p in cohort.patients}
    missing = [pid for key in ("train_patients", "test_patients") for pid in split[key] if pid not in by_id]
    if missing:
        raise ValueError(f"{fold_dir.name}: patients not in the cohort: {', '.join(missing[:10])}")
    train = [by_id[pid] for pid in split["train_patients"]]
    test = [by_id[pid] for pid in split["test_patients"]]
    leak = {p.id for p in train} & {p.id for p in test}
    if leak:
        raise ValueError(f"{fold_dir.name}: patients in both train and test: {sorted(leak)[:10]}")
    checkpoint = fold_dir / CHECKPOINT_NAME
    if checkpoint.exists() and _reusable(checkpoint, {p.id for p in train}, advanced):
        log.info("reusing %s", checkpoint)
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
            inner_train, inner_valid, cohort, advanced=advanced, output_dir=fold_dir, seed=seed, log=log
        )
    table = predict_patients(
        checkpoint,
        test,
        patient_label=patient_label,
        accelerator=advanced.accelerator,
        num_workers=advanced.num_workers,
    )
    write_csv(table, preds)
    log.info("wrote %s", preds)
    return preds


def run_crossval(
    cohort: Any,
    output_dir: Path,
    *,
    n_splits: int,
    advanced: AdvancedConfig,
    patient_label: str = "PATIENT",
) -> list[Path]:
    """All folds in sequence (the Prefect flow maps :func:`run_fold` instead); returns the preds paths."""
    splits = prepare_splits(cohort, Path(output_dir), n_splits, advanced.seed)
    return [
        run_fold(
            cohort, split, fold_dir(Path(output_dir), i), advanced, advanced.seed, patient_label=patient_label
        )
        for i, split in enumerate(splits)
    ]
