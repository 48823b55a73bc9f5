"""Our checkpoint format: ``model.ckpt`` = ``torch.save({"format", "meta", "state_dict"})``.

``meta`` holds only JSON-like values (so the file loads with ``weights_only=True``) and records
everything needed to rebuild the model and to judge a deployment (see :data:`META_KEYS`).
Checkpoints are written to a temp name and renamed, so a half-written ``model.ckpt`` never exists.
STAMP's own Lightning checkpoints are recognised and refused with a message (out of scope).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import torch
from torch import nn

import stamp
from stamp.fileio import atomic_path
from stamp.hashing import code_hash

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "META_KEYS",
    "CheckpointError",
    "config_hash",
    "describe_versions",
    "feature_provenance",
    "infer_dim_input",
    "load_checkpoint",
    "load_meta",
    "modeling_code_version",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "stamp-orchestrated-1"
CHECKPOINT_NAME = "model.ckpt"

#: Keys every checkpoint's ``meta`` has (values may be ``None`` where they do not apply).
META_KEYS = (
    "task",  # classification | regression | survival
    "model_name",
    "model_params",  # the model's config block as a dict
    "dim_input",
    "n_outputs",  # int, or list[int] per target (multi-target)
    "feature_type",  # tile | slide | patient
    "targets",  # ground-truth column(s); survival: [time_label, status_label]
    "ground_truth_label",  # str | list[str] | None (survival)
    "time_label",
    "status_label",
    "categories",  # {target: [class, ...]} (classification) else {}
    "class_weights",  # {target: [w, ...]} aligned with categories
    "train_patients",
    "valid_patients",
    "extractor",  # tile extractor / slide encoder name from the feature files
    "weights_sha256",  # encoder weights digest recorded in the feature files (None: not recorded)
    "code_version",  # sha256 over stamp/modeling sources
    "config_hash",  # sha256 of the settings that decide the model
    "stamp_version",  # STAMP release whose formats we follow
    "package_version",  # this package's version
    "survival_cut_off",  # median training risk (survival) else None
    "target_mean",  # regression: targets are standardised for training, predictions restored
    "target_std",
    "seed",
    "best_epoch",
    "epochs_trained",
    "monitor",  # metric used for early stopping / checkpoint choice
    "monitor_value",
    "advanced_config",  # the advanced_config used (dict)
    "provenance",  # key of the training provenance (stamp.modeling.provenance) or None
)

_MODELING_DIR = Path(__file__).resolve().parent


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file named in the message."""


@cache
def modeling_code_version() -> str:
    """sha256 over the modeling package's sources (this folder and its sub-packages)."""
    return code_hash(_MODELING_DIR.rglob("*.py"))


def config_hash(settings: Mapping[str, Any]) -> str:
    """sha256 of ``settings`` as canonical JSON (sorted keys; paths and other objects as str)."""
    blob = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Reduce ``value`` to dict/list/str/int/float/bool/None so ``weights_only`` loading works."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s state dict and ``meta`` to ``path`` atomically; return the path."""
    path = Path(path)
    missing = [k for k in ("task", "model_name", "model_params", "dim_input", "n_outputs") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {', '.join(missing)}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": _jsonable(dict(meta)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _looks_like_lightning(path: Path) -> bool:
    """True for a Lightning checkpoint, found without unpickling (no code from the file runs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
            return any(b"pytorch-lightning_version" in zf.read(n) for n in pickles)
    except (zipfile.BadZipFile, OSError):
        return False


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if _looks_like_lightning(path):
        raise CheckpointError(
            f"{path}: this is a STAMP (PyTorch Lightning) checkpoint; loading those is not supported "
            "here. Retrain with `stamp train` or `stamp crossval` to get a model.ckpt in our format"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: unknown checkpoint format {found!r} (expected {CHECKPOINT_FORMAT!r}); "
            "was it written by `stamp train` / `stamp crossval`?"
        )
    return payload


def load_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta`` dict of a checkpoint, without building the model."""
    return dict(_read(Path(path))["meta"])


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of checkpoint ``path`` (in eval mode) and return it with its ``meta``."""
    path = Path(path)
    payload = _read(path)
    from stamp.modeling.models.registry import build_model

    meta = dict(payload["meta"])
    try:
        model = build_model(
            meta["model_name"],
            dim_input=int(meta["dim_input"]),
            n_outputs=meta["n_outputs"],
            params=meta.get("model_params") or {},
        )
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild model {meta.get('model_name')!r}: {exc}") from exc
    model.to(map_location)
    model.eval()
    return model, meta


def infer_dim_input(patient: Any) -> int:
    """Feature dimension of a patient's first feature file (read from the h5 shape only)."""
    path = Path(patient.feature_files[0])
    with h5py.File(path, "r") as h5:
        name = "feats" if "feats" in h5 else "patch_embeddings"
        shape = h5[name].shape
    return int(shape[-1])


def feature_provenance(patients: Sequence[Any]) -> tuple[str | None, str | None]:
    """(extractor / encoder name, weights sha256) recorded in the patients' feature files.

    Raises if the files come from different extractors or weights (features that cannot be mixed).
    """
    seen: dict[tuple[str | None, str | None], Path] = {}
    for p in patients:
        for f in p.feature_files:
            with h5py.File(f, "r") as h5:
                attrs = h5.attrs
                name = attrs.get("extractor", attrs.get("encoder"))
                digest = attrs.get("weights_sha256")
            key = (_as_str(name), _as_str(digest))
            seen.setdefault(key, Path(f))
    if len(seen) > 1:
        (a, fa), (b, fb) = list(seen.items())[:2]
        raise ValueError(
            f"feature files come from different extractors/weights: {fa} ({a[0]}, {a[1]}) vs {fb} ({b[0]}, {b[1]}); "
            "train on features of one extractor"
        )
    return next(iter(seen)) if seen else (None, None)


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def describe_versions() -> dict[str, str]:
    """The version fields every checkpoint records."""
    return {
        "code_version": modeling_code_version(),
        "stamp_version": stamp.STAMP_COMPAT_VERSION,
        "package_version": stamp.__version__,
    }
