"""The feature h5 format (DESIGN contract 2), STAMP-compatible in both directions.

Tile features: dataset ``feats`` float16 (N, D), ``coords`` float32 (N, 2) = tile top-left
(x, y) at level 0 in µm; attrs ``extractor, unit="um", tile_size_um, tile_size_px,
feat_type="tile", stamp_version, code_hash`` plus ours (``slide_sha256, mpp_requested,
mpp_effective, weights_sha256, config_sha256, reader, ...``). We write tiles sorted by
(y, x) without HDF5 timestamps, so the same input gives the same bytes.

:func:`read_features` also loads what STAMP wrote over the years (stamp-facts §3.1):
(a) early v2 ``tile_size`` + ``unit="um"``; (b) current ``tile_size_um``; (c) v1 files
without a unit whose coords are in 224-px steps (→ ×256/224 µm, 256 µm / 224 px tiles);
and slide/patient embeddings (1-D ``feats``, ``feat_type`` slide|patient).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stamp import STAMP_COMPAT_VERSION
from stamp.fileio import atomic_path

FEATURE_FORMAT_VERSION = 1
#: h5 attribute holding the provenance (JSON: key, stage, inputs, settings, code, weights) of our files.
PROVENANCE_ATTR = "stamp_provenance"
FEAT_TYPES = ("tile", "slide", "patient")


class FeatureFileError(ValueError):
    """A feature file that cannot be read, with the file named in the message."""


@dataclass
class Features:
    """Features of one slide (tile) or one embedding (slide/patient), coords in µm."""

    feats: np.ndarray
    coords_um: np.ndarray | None
    feat_type: str
    tile_size_um: float | None
    tile_size_px: int | None
    extractor: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    layout: str = "current"

    @property
    def mpp(self) -> float | None:
        """µm per feature-tile pixel, ``tile_size_um / tile_size_px`` (None for embeddings)."""
        if self.tile_size_um is None or not self.tile_size_px:
            return None
        return self.tile_size_um / self.tile_size_px


def sort_by_yx(coords: np.ndarray) -> np.ndarray:
    """Indices that order tiles by (y, x), i.e. row-major reading order."""
    coords = np.asarray(coords)
    if len(coords) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.lexsort((coords[:, 0], coords[:, 1]))


def _attr(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def write_tile_features(
    path: str | os.PathLike[str],
    feats: np.ndarray,
    coords_um: np.ndarray,
    *,
    extractor: str,
    tile_size_um: float,
    tile_size_px: int,
    code_hash: str,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write tile features sorted by (y, x) to ``path`` atomically (temp file + rename)."""
    feats = np.asarray(feats)
    coords_um = np.asarray(coords_um, dtype=np.float32)
    if feats.ndim != 2 or coords_um.shape != (len(feats), 2):
        raise ValueError(
            f"{path}: feats must be (N, D) and coords (N, 2); got {feats.shape} and {coords_um.shape}"
        )
    order = sort_by_yx(coords_um)
    attrs: dict[str, Any] = {
        "extractor": extractor,
        "unit": "um",
        "tile_size_um": float(tile_size_um),
        "tile_size_px": int(tile_size_px),
        "feat_type": "tile",
        "stamp_version": STAMP_COMPAT_VERSION,
        "code_hash": code_hash,
        "feature_format": FEATURE_FORMAT_VERSION,
    }
    attrs.update({k: _attr(v) for k, v in (extra_attrs or {}).items() if v is not None})
    return _atomic_h5(
        Path(path), {"feats": feats[order].astype(np.float16), "coords": coords_um[order]}, attrs
    )


def write_embedding(
    path: str | os.PathLike[str],
    feats: np.ndarray,
    *,
    feat_type: str,
    encoder: str,
    code_hash: str,
    precision: str = "torch.float32",
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a slide or patient embedding (1-D ``feats``) the way STAMP's encoders do."""
    if feat_type not in ("slide", "patient"):
        raise ValueError(f"feat_type must be 'slide' or 'patient', not {feat_type!r}")
    attrs: dict[str, Any] = {
        "version": STAMP_COMPAT_VERSION,
        "encoder": encoder,
        "precision": precision,
        "stamp_version": STAMP_COMPAT_VERSION,
        "code_hash": code_hash,
        "feat_type": feat_type,
        "feature_format": FEATURE_FORMAT_VERSION,
    }
    attrs.update({k: _attr(v) for k, v in (extra_attrs or {}).items() if v is not None})
    return _atomic_h5(Path(path), {"feats": np.asarray(feats).reshape(-1)}, attrs)


def _atomic_h5(path: Path, datasets: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as h5:
        for name, data in datasets.items():
            h5.create_dataset(name, data=data, track_times=False)
        for key, value in attrs.items():
            h5.attrs[key] = value
    return path


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class FeatureHeader:
    """A feature h5's attributes and the shape of its features, read without loading any data."""

    attrs: dict[str, Any]
    #: shape of ``feats`` (or the older ``patch_embeddings``); None when the file has neither
    shape: tuple[int, ...] | None

    @property
    def feat_type(self) -> str:
        """``tile``, ``slide`` or ``patient`` (see :func:`feat_type_of`)."""
        return feat_type_of(self.attrs)

    @property
    def extractor(self) -> str | None:
        """The tile extractor or slide/patient encoder that wrote the features (see :func:`extractor_of`)."""
        return extractor_of(self.attrs)


def feat_type_of(attrs: Mapping[str, Any]) -> str:
    """The file's ``feat_type``; files without one are tile features, or slide embeddings when they
    name an ``encoder`` (STAMP's slide encoders before ``feat_type`` existed)."""
    return str(attrs.get("feat_type") or ("slide" if "encoder" in attrs else "tile"))


def extractor_of(attrs: Mapping[str, Any]) -> str | None:
    """The tile extractor (``extractor``) or slide/patient encoder (``encoder``) a file records."""
    return attrs.get("extractor") or attrs.get("encoder")


def read_feature_header(path: str | os.PathLike[str], only: tuple[str, ...] | None = None) -> FeatureHeader:
    """The attributes (``only`` these, when given: reading all of them costs ~20 ms a file) and the
    features' shape of a feature h5; raises :class:`FeatureFileError` when it cannot be read."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            keys = h5.attrs.keys() if only is None else [k for k in only if k in h5.attrs]
            attrs = {k: _decode(h5.attrs[k]) for k in keys}
            name = next((n for n in ("feats", "patch_embeddings") if n in h5), None)
            shape = tuple(h5[name].shape) if name is not None else None
    except (OSError, KeyError) as exc:
        raise FeatureFileError(
            f"{path}: not a readable h5 feature file ({exc}); re-run preprocess for it"
        ) from exc
    return FeatureHeader(attrs, shape)


def read_features(path: str | os.PathLike[str]) -> Features:
    """Load a feature h5 written by us or by any STAMP version (see module docstring)."""
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(
            f"{path}: not a readable h5 feature file ({exc}); re-run preprocess for it"
        ) from exc
    with h5:
        attrs = {k: _decode(v) for k, v in h5.attrs.items()}
        if "feats" in h5:
            feats = h5["feats"][()]
        elif "patch_embeddings" in h5:
            feats = h5["patch_embeddings"][()]
        else:
            raise FeatureFileError(f"{path}: no 'feats' dataset; is this a STAMP feature file?")
        coords = h5["coords"][()] if "coords" in h5 else None
    feat_type = feat_type_of(attrs)
    if feat_type not in FEAT_TYPES:
        raise FeatureFileError(
            f"{path}: unknown feat_type {feat_type!r} (expected one of {', '.join(FEAT_TYPES)})"
        )
    extractor = extractor_of(attrs)
    if feat_type != "tile":
        return Features(
            feats.reshape(1, -1) if feats.ndim == 1 else feats, None, feat_type, None, None, extractor, attrs
        )
    if feats.ndim != 2:
        raise FeatureFileError(f"{path}: tile 'feats' must be 2-D (tiles × dims), got shape {feats.shape}")
    if coords is None:  # STAMP's multiplex branch: embeddings without coordinates
        fake = np.stack([np.arange(len(feats)), np.zeros(len(feats))], axis=1).astype(np.float32)
        return Features(feats, fake, "tile", None, None, extractor, attrs, layout="no-coords")
    coords = np.asarray(coords, dtype=np.float32).reshape(len(feats), 2)
    tile_um, tile_px, layout = _tile_geometry(path, attrs, coords)
    if layout == "v1":
        coords = coords * np.float32(256 / 224)
    return Features(feats, coords, "tile", tile_um, tile_px, extractor, attrs, layout=layout)


def _tile_geometry(path: Path, attrs: Mapping[str, Any], coords: np.ndarray) -> tuple[float, int | None, str]:
    if "tile_size_um" in attrs:
        px = attrs.get("tile_size_px")
        return float(attrs["tile_size_um"]), int(px) if px is not None else None, "current"
    if "tile_size" in attrs and attrs.get("unit") == "um":
        px = attrs.get("tile_size_px")
        return float(attrs["tile_size"]), int(px) if px is not None else None, "early-v2"
    stride = _coord_stride(coords)
    if stride is None or abs(stride - 224) < 1:
        return 256.0, 224, "v1"
    raise FeatureFileError(
        f"{path}: cannot tell the tile size (no tile_size_um/tile_size attrs, coord step {stride:g} is not the "
        "v1 224-px step); re-extract the features or add the tile_size_um attribute"
    )


def _coord_stride(coords: np.ndarray) -> float | None:
    steps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if len(values) > 1:
            steps.append(float(np.diff(values).min()))
    return min(steps) if steps else None
