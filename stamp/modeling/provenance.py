"""What modeling outputs are computed from (see :mod:`stamp.provenance`): one function per kind of output.

Inputs are the patients' feature files by content digest (so the extractor and its weights digest,
which the files record, are covered too); settings hold the patients' parsed targets, the task and
its columns and categories, the model settings and the seed. A change to a table row that does not
change a used patient's target or feature files changes nothing here, on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stamp.config_models import AdvancedConfig
from stamp.hashing import DigestIndex, shared_index
from stamp.provenance import Provenance

__all__ = ["RUNTIME_KEYS", "deploy_provenance", "fold_provenance", "patient_inputs", "training_provenance"]

#: advanced_config keys that change how a model is computed, not what it is.
RUNTIME_KEYS = frozenset({"num_workers", "accelerator"})


def patient_inputs(patients: Sequence[Any], index: DigestIndex | None = None) -> dict[str, str]:
    """``{"<patient>/<feature file name>": sha256}`` over the patients' feature files."""
    index = index or shared_index()
    out: dict[str, str] = {}
    for p in patients:
        for i, f in enumerate(p.feature_files):
            name = f"{p.id}/{Path(f).name}"
            out[name if name not in out else f"{name}#{i}"] = index.sha256(f)
    return out


def _cohort_settings(cohort: Any) -> dict[str, Any]:
    return {
        "task": cohort.task,
        "feature_type": cohort.feature_type,
        "target_columns": list(cohort.targets),
        "categories": {t: list(c) for t, c in (cohort.categories or {}).items()},
    }


def _targets(patients: Sequence[Any]) -> dict[str, Any]:
    return {p.id: p.target for p in patients}


def _advanced(advanced: AdvancedConfig) -> dict[str, Any]:
    return {k: v for k, v in advanced.model_dump(mode="json").items() if k not in RUNTIME_KEYS}


def training_provenance(
    cohort: Any, train: Sequence[Any], advanced: AdvancedConfig, seed: int | None, *, code: str
) -> Provenance:
    """A model trained on ``train`` (its inner validation split is drawn from them with ``seed``)."""
    return Provenance(
        stage="train-model",
        inputs=patient_inputs(train),
        settings={
            **_cohort_settings(cohort),
            "train_patients": sorted(p.id for p in train),
            "targets": _targets(train),
            "advanced": _advanced(advanced),
            "seed": seed,
        },
        code=code,
    )


def fold_provenance(
    cohort: Any,
    train: Sequence[Any],
    test: Sequence[Any],
    advanced: AdvancedConfig,
    seed: int | None,
    *,
    patient_label: str,
    code: str,
) -> Provenance:
    """A crossval fold: the model trained on ``train`` and its predictions for ``test``."""
    return Provenance(
        stage="crossval-fold",
        inputs=patient_inputs([*train, *test]),
        settings={
            **_cohort_settings(cohort),
            "train_patients": sorted(p.id for p in train),
            "test_patients": sorted(p.id for p in test),
            "targets": _targets([*train, *test]),
            "advanced": _advanced(advanced),
            "seed": seed,
            "patient_label": patient_label,
        },
        code=code,
    )


def deploy_provenance(
    cohort: Any,
    checkpoints: Sequence[Path],
    *,
    patient_label: str,
    code: str,
    index: DigestIndex | None = None,
) -> Provenance:
    """Predictions of ``checkpoints`` (by content) for the cohort's patients."""
    index = index or shared_index()
    return Provenance(
        stage="deploy",
        inputs={
            **{f"checkpoint-{i}": index.sha256(c) for i, c in enumerate(checkpoints)},
            **patient_inputs(cohort.patients, index),
        },
        settings={
            **_cohort_settings(cohort),
            "patients": sorted(p.id for p in cohort.patients),
            "targets": _targets(cohort.patients),
            "patient_label": patient_label,
        },
        code=code,
    )
