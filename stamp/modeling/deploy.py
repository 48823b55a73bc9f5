"""Deployment: predict a cohort with one or more checkpoints (stamp-facts §2.8).

* All checkpoints must agree on task, target column(s) and categories (else a clear error).
* Tile models only take tile features; slide- and patient-level models take either.
* A deployment patient who was in a checkpoint's training or validation set is reported with a
  CRITICAL ``DATA LEAKAGE DETECTED`` log naming the patients (prediction goes on).
* Outputs (``output_dir``): one checkpoint → ``patient-preds.csv``; several →
  ``patient-preds-<i>.csv`` per checkpoint (0-based, in the given order) and ``patient-preds.csv``
  = the ensemble: STAMP's columns from the models' mean plus ``std_…`` spread columns
  (see :mod:`stamp.modeling.predictions`).
* Bags are predicted one patient at a time from disk (no feature cache), so memory is bounded by
  the largest bag.
* The prediction files are one output unit with a provenance record (checkpoints and features by
  content, the patients' targets, the code): reused when it is this run's, replaced when it is
  ours, never written over files we did not write.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stamp.fileio import staging_dir
from stamp.modeling.checkpoint import load_checkpoint, load_meta, modeling_code_version
from stamp.modeling.losses import TargetCodec
from stamp.modeling.predictions import (
    PREDS_NAME,
    Outputs,
    bag_dataset,
    ensemble_outputs,
    forward_all,
    patient_preds_table,
    to_outputs,
    write_csv,
)
from stamp.modeling.provenance import deploy_provenance
from stamp.modeling.train import resolve_torch_device
from stamp.provenance import Check, Provenance, Verdict, check_files, publish_files

__all__ = ["DeployResult", "check_compatible", "check_deployment", "deploy", "deployment_spec", "predict"]

_logger = logging.getLogger("stamp")


@dataclass
class DeployResult:
    """Per-checkpoint tables (in the given order) and the ensemble table (None for one checkpoint)."""

    per_model: list[pd.DataFrame]
    ensemble: pd.DataFrame | None


def _signature(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": meta.get("task"),
        "targets": list(meta.get("targets") or []),
        "categories": {t: list(c) for t, c in (meta.get("categories") or {}).items()},
    }


def check_compatible(checkpoint_paths: Sequence[Path], metas: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first checkpoint whose task, targets or categories differ."""
    ref = _signature(metas[0])
    for path, meta in zip(checkpoint_paths[1:], metas[1:], strict=True):
        sig = _signature(meta)
        for key in ("task", "targets", "categories"):
            if sig[key] != ref[key]:
                raise ValueError(
                    f"checkpoints disagree on {key}: {checkpoint_paths[0]} has {ref[key]!r} but {path} has "
                    f"{sig[key]!r}; deploy checkpoints of the same task, labels and categories together"
                )
        if (meta.get("feature_type") == "tile") != (metas[0].get("feature_type") == "tile"):
            raise ValueError(
                f"checkpoints disagree on feature level: {checkpoint_paths[0]} takes "
                f"{metas[0].get('feature_type')} features but {path} takes {meta.get('feature_type')} features"
            )
        if meta.get("dim_input") != metas[0].get("dim_input"):
            raise ValueError(
                f"checkpoints disagree on the feature dimension: {checkpoint_paths[0]} "
                f"({metas[0].get('dim_input')}) vs {path} ({meta.get('dim_input')})"
            )


def deployment_spec(checkpoint_paths: Sequence[Path]) -> dict[str, Any]:
    """What the checkpoints expect, for loading the deployment cohort (``stamp.cohort.load_cohort``).

    Keys: ``task``, ``feature_type``, ``targets``, ``ground_truth_label``, ``time_label``,
    ``status_label``, ``categories`` (per target), ``extractor``, ``dim_input``.
    """
    paths = [Path(p) for p in checkpoint_paths]
    if not paths:
        raise ValueError("deployment.checkpoint_paths is empty")
    metas = [load_meta(p) for p in paths]
    check_compatible(paths, metas)
    m = metas[0]
    keys = ("task", "feature_type", "targets", "ground_truth_label", "time_label", "status_label")
    spec = {k: m.get(k) for k in keys}
    spec.update(
        categories=m.get("categories") or {}, extractor=m.get("extractor"), dim_input=m.get("dim_input")
    )
    return spec


def _check_features(path: Path, meta: dict[str, Any], cohort: Any) -> None:
    model_type, data_type = meta.get("feature_type"), cohort.feature_type
    if model_type == "tile" and data_type != "tile":
        raise ValueError(f"{path}: a tile-level model cannot take {data_type}-level features")
    if model_type != "tile" and data_type == "tile":
        raise ValueError(
            f"{path}: a {model_type}-level model needs slide/patient embeddings, not tile features"
        )
    info = getattr(cohort, "feature_info", None) or {}
    dim = info.get("dim")
    if dim is not None and meta.get("dim_input") is not None and int(dim) != int(meta["dim_input"]):
        raise ValueError(
            f"{path}: the model takes {meta['dim_input']}-dim features but the deployment features are "
            f"{dim}-dim (extractor {info.get('extractor')}); extract them with {meta.get('extractor')}"
        )
    extractor = info.get("extractor")
    if extractor and meta.get("extractor") and extractor != meta["extractor"]:
        _logger.warning(
            "%s was trained on %s features but the deployment features come from %s",
            path,
            meta["extractor"],
            extractor,
        )
    digest = info.get("weights_sha256")
    if digest and meta.get("weights_sha256") and digest != meta["weights_sha256"]:
        _logger.warning(
            "%s: the deployment features were made with other encoder weights than training's", path
        )


def _warn_leakage(path: Path, meta: dict[str, Any], patient_ids: Sequence[str]) -> None:
    seen = set(meta.get("train_patients") or []) | set(meta.get("valid_patients") or [])
    leaked = sorted(set(patient_ids) & seen)
    if leaked:
        _logger.critical(
            "DATA LEAKAGE DETECTED: %d deployment patient(s) were in the training/validation set of %s: %s%s",
            len(leaked),
            path,
            ", ".join(leaked[:20]),
            " ..." if len(leaked) > 20 else "",
        )


def _column_codec(meta: dict[str, Any], cohort: Any) -> TargetCodec:
    """Codec of the checkpoint, with the cohort's target names where it names other columns."""
    codec = TargetCodec.from_meta(meta)
    names = list(getattr(cohort, "targets", None) or [])
    if names and names != codec.targets:
        if len(names) != len(codec.targets):
            raise ValueError(
                f"the checkpoints predict {codec.targets} but the deployment asks for {names}; "
                "leave ground_truth_label empty to use the checkpoints' labels"
            )
        _logger.warning("the checkpoints were trained on %s; reporting them as %s", codec.targets, names)
        codec.categories = (
            {new: codec.categories[old] for old, new in zip(codec.targets, names, strict=True)}
            if codec.categories
            else {}
        )
        codec.targets = names
    return codec


def predict(
    checkpoint_paths: Sequence[Path],
    cohort: Any,
    *,
    patient_label: str = "PATIENT",
    accelerator: str | None = None,
    num_workers: int = 0,
) -> DeployResult:
    """Predict every cohort patient with each checkpoint; see the module docstring."""
    paths = [Path(p) for p in checkpoint_paths]
    if not paths:
        raise ValueError("deployment.checkpoint_paths is empty")
    metas = [load_meta(p) for p in paths]
    check_compatible(paths, metas)
    patients = sorted(cohort.patients, key=lambda p: p.id)
    ids = [p.id for p in patients]
    truths = [p.target for p in patients]
    device = resolve_torch_device(accelerator)
    codec = _column_codec(metas[0], cohort)
    outputs: list[Outputs] = []
    tables: list[pd.DataFrame] = []
    for path, meta in zip(paths, metas, strict=True):
        _check_features(path, meta, cohort)
        _warn_leakage(path, meta, ids)
        model, _ = load_checkpoint(path, map_location=device)
        raw = forward_all(
            model,
            bag_dataset(patients, cache=False),
            feature_type=cohort.feature_type,
            device=device,
            num_workers=num_workers,
        )
        member = TargetCodec.from_meta(meta)
        member.targets, member.categories = codec.targets, codec.categories
        out = to_outputs(member, raw, ids)
        outputs.append(out)
        tables.append(_table(out, truths, codec, patient_label, meta.get("survival_cut_off")))
        del model
    if len(outputs) == 1:
        return DeployResult(tables, None)
    cut_offs = [m.get("survival_cut_off") for m in metas]
    mean_cut = sum(cut_offs) / len(cut_offs) if all(c is not None for c in cut_offs) else None  # type: ignore[arg-type]
    ensemble = _table(ensemble_outputs(outputs), truths, codec, patient_label, mean_cut)
    return DeployResult(tables, ensemble)


def _table(
    out: Outputs, truths: list[Any], codec: TargetCodec, patient_label: str, cut_off: float | None
) -> pd.DataFrame:
    return patient_preds_table(
        out,
        truths,
        task=codec.task,
        targets=codec.targets,
        categories=codec.categories,
        patient_label=patient_label,
        cut_off=cut_off,
    )


def output_names(n_checkpoints: int) -> list[str]:
    """The files :func:`deploy` writes for ``n_checkpoints`` checkpoints (the ensemble / single table last)."""
    per_model = [f"patient-preds-{i}.csv" for i in range(n_checkpoints)] if n_checkpoints > 1 else []
    return [*per_model, PREDS_NAME]


def _expected(checkpoint_paths: Sequence[Path], cohort: Any, patient_label: str) -> Provenance:
    return deploy_provenance(
        cohort, [Path(p) for p in checkpoint_paths], patient_label=patient_label, code=modeling_code_version()
    )


def check_deployment(
    checkpoint_paths: Sequence[Path], cohort: Any, output_dir: Path, *, patient_label: str = "PATIENT"
) -> Check:
    """:class:`stamp.provenance.Check` of the prediction files in ``output_dir`` against this deployment."""
    expected = _expected(checkpoint_paths, cohort, patient_label)
    return check_files(Path(output_dir), PREDS_NAME, output_names(len(checkpoint_paths)), expected)


def deploy(
    checkpoint_paths: Sequence[Path],
    cohort: Any,
    output_dir: Path,
    *,
    patient_label: str = "PATIENT",
    accelerator: str | None = None,
    num_workers: int = 0,
) -> list[Path]:
    """:func:`predict` and write the tables (or reuse them); returns the paths (ensemble / single last).

    Raises :class:`stamp.provenance.ForeignOutput` when a prediction file there is not ours.
    """
    output_dir = Path(output_dir)
    names = output_names(len(checkpoint_paths))
    expected = _expected(checkpoint_paths, cohort, patient_label)
    check = check_files(output_dir, PREDS_NAME, names, expected)
    if check.reusable:
        _logger.info("%s: predicted with the same provenance; reusing it", output_dir / PREDS_NAME)
        return [output_dir / n for n in names]
    check.raise_if_foreign()
    if check.verdict is Verdict.STALE:
        _logger.info("%s: predicting again (%s)", output_dir / PREDS_NAME, check.reason)
    result = predict(
        checkpoint_paths,
        cohort,
        patient_label=patient_label,
        accelerator=accelerator,
        num_workers=num_workers,
    )
    tables = result.per_model if result.ensemble is None else [*result.per_model, result.ensemble]
    with staging_dir(output_dir / PREDS_NAME) as staging:
        for name, df in zip(names, tables, strict=True):
            write_csv(df, staging / name)
        publish_files(output_dir, PREDS_NAME, {n: staging / n for n in names}, expected)
        shutil.rmtree(staging, ignore_errors=True)
    return [output_dir / n for n in names]
