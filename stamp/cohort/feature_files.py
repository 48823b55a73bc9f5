"""The feature-file side of a cohort: h5 probing, feature-type detection and feature_info.

Each feature h5 is probed from its attrs and dataset shapes only (no data read): its type
(tile / slide / patient), tile count, feature dim, extractor and weights digest. All files under a
``feature_dir`` must share one type (:func:`detect_feature_type`) and the files of the usable
patients one dim (``feature_info``). Part of :mod:`stamp.cohort`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from stamp.confinement import check_input
from stamp.features import FeatureFileError, read_feature_header

logger = logging.getLogger("stamp")

FeatureType = Literal["tile", "slide", "patient"]


class FeatureProbe(NamedTuple):
    feat_type: str | None  # None: unreadable
    n: int = 0  # tiles (1 for an embedding)
    dim: int = 0
    extractor: str | None = None
    weights_sha256: str | None = None


def probe_feature_file(path: Path) -> FeatureProbe:
    """Type, tile count and dim of a feature h5 from its attrs and shapes (no data read)."""
    try:
        header = read_feature_header(path)
    except FeatureFileError:
        return FeatureProbe(None)
    shape = header.shape
    if shape is None:
        return FeatureProbe(None)
    ftype = header.feat_type
    n = shape[0] if ftype == "tile" and len(shape) == 2 else 1
    weights = header.attrs.get("weights_sha256")
    return FeatureProbe(ftype, n, shape[-1] if shape else 0, header.extractor, weights)


def scan_feature_dir(feature_dir: Path) -> dict[Path, FeatureProbe]:
    if not feature_dir.is_dir():
        raise FileNotFoundError(f"{feature_dir}: feature_dir not found")
    files = sorted(p for p in feature_dir.rglob("*") if p.suffix.lower() == ".h5" and p.is_file())
    return {p: probe_feature_file(check_input(p, f"{feature_dir}: feature file {p}")) for p in files}


def feature_type_of_scan(scan: Mapping[Path, FeatureProbe], feature_dir: Path) -> FeatureType:
    by_type: dict[str, list[Path]] = defaultdict(list)
    for path, probe in scan.items():
        if probe.feat_type is not None:
            by_type[probe.feat_type].append(path)
    if not by_type:
        raise ValueError(f"{feature_dir}: no readable .h5 feature files; check feature_dir")
    if len(by_type) > 1:
        parts = [f"{len(v)} {k} (e.g. {v[0].relative_to(feature_dir)})" for k, v in sorted(by_type.items())]
        raise ValueError(
            f"{feature_dir}: mixed feature types: {', '.join(parts)}; use one feature_dir per type"
        )
    (ftype,) = by_type
    if ftype not in ("tile", "slide", "patient"):
        raise ValueError(f"{feature_dir}: unknown feat_type {ftype!r} (e.g. {by_type[ftype][0]})")
    return ftype  # type: ignore[return-value]


def detect_feature_type(feature_dir: Path) -> FeatureType:
    """tile / slide / patient from the h5 attrs of every feature file under ``feature_dir``."""
    feature_dir = Path(os.path.abspath(feature_dir))
    return feature_type_of_scan(scan_feature_dir(feature_dir), feature_dir)


def feature_path(feature_dir: Path, name: str, label: str | None = None) -> Path:
    """FILENAME → h5 path; ``x`` and ``x.svs`` find ``x.h5`` too (STAMP requires the ``.h5``).

    In a watcher-started run the path must resolve inside the cohort's folders (``label`` names the entry).
    """
    label = label or f"{feature_dir}: FILENAME {name!r}"
    if name.lower().endswith(".h5"):
        return check_input(os.path.normpath(feature_dir / name), label)
    plain = Path(os.path.normpath(feature_dir / f"{name}.h5"))
    swapped = Path(os.path.normpath(feature_dir / name)).with_suffix(".h5")
    return check_input(
        swapped if Path(name).suffix and not plain.exists() and swapped.exists() else plain, label
    )


def feature_info(files: Iterable[Path], scan: Mapping[Path, FeatureProbe]) -> dict[str, Any]:
    """Dim, extractor(s), weights digest(s), file and tile counts of ``files`` (one dim required)."""
    probes = [scan.get(f) or probe_feature_file(f) for f in files]
    dims = sorted({pr.dim for pr in probes})
    if len(dims) > 1:
        raise ValueError(
            f"feature files have different feature dims {dims}; use one extractor per feature_dir"
        )
    extractors = sorted({str(pr.extractor) for pr in probes if pr.extractor})
    if len(extractors) > 1:
        logger.warning("feature files come from several extractors: %s", ", ".join(extractors))
    digests = sorted({str(pr.weights_sha256) for pr in probes if pr.weights_sha256})
    return {
        "dim": dims[0],
        "extractor": ", ".join(extractors) or None,
        "weights_sha256": ", ".join(digests) or None,
        "n_files": len(probes),
        "n_tiles": int(sum(pr.n for pr in probes)),
    }
