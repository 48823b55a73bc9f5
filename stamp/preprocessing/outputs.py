"""Where a slide's outputs go, and whether outputs found there (or elsewhere) may be reused.

The feature folder is ``<output_dir>/<extractor>-<code hash 8>`` (:func:`feature_dir`); a slide's h5
mirrors its path under ``wsi_dir`` (:func:`h5_path_for`), with its rejection thumbnail and tissue
contours beside it (:func:`output_paths`). The three files are one output unit of
:mod:`stamp.provenance`: :func:`check_slide_outputs` decides reuse, :func:`serve_cached` and
:func:`place_finished` serve a cached result at a new path. Part of :mod:`stamp.preprocessing`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stamp.config_models import PreprocessingConfig
from stamp.features import PROVENANCE_ATTR, FeatureFileError, FeatureHeader, read_feature_header
from stamp.fileio import staged_file
from stamp.preprocessing.params import PreprocessParams, preprocessing_code_hash
from stamp.provenance import (
    Check,
    ForeignOutput,
    Provenance,
    Subject,
    Verdict,
    check_files,
    publish_files,
    read_record,
    record_path,
)


def feature_dir(cfg: PreprocessingConfig, code: str | None = None) -> Path:
    """``<output_dir>/<extractor>-<code hash 8>`` (STAMP's layout), or without hash if disabled.

    ``code``: the preprocessing code version (default: :func:`preprocessing_code_hash` now).
    """
    if not cfg.generate_hash:
        return Path(cfg.output_dir) / cfg.extractor
    return Path(cfg.output_dir) / f"{cfg.extractor}-{(code or preprocessing_code_hash())[:8]}"


def h5_path_for(slide: Path, wsi_dir: Path, feat_dir: Path) -> Path:
    """Mirror the slide's path under ``wsi_dir`` inside ``feat_dir``, with suffix ``.h5``.

    The path is taken as written (a slide in a symlinked sub-folder keeps that sub-folder); a slide
    outside ``wsi_dir`` (a ``wsi_list`` entry) gets its file name only.
    """
    try:
        rel = Path(os.path.normpath(slide)).relative_to(os.path.normpath(wsi_dir))
    except ValueError:
        try:
            rel = slide.resolve().relative_to(wsi_dir.resolve())
        except ValueError:
            rel = Path(slide.name)
    return feat_dir / rel.with_suffix(".h5")


def colliding_outputs(h5_paths: dict[Path, Path]) -> dict[Path, str]:
    """Slides that would share one h5 with another slide → the one-line reason they are refused."""
    by_h5: dict[Path, list[Path]] = defaultdict(list)
    for slide, h5 in h5_paths.items():
        by_h5[h5].append(slide)
    out: dict[Path, str] = {}
    for h5, slides in by_h5.items():
        if len(slides) > 1:
            names = ", ".join(str(s) for s in sorted(slides))
            for s in slides:
                out[s] = (
                    f"{len(slides)} slides would share the feature file {h5.name} ({names}); "
                    "rename them or list them by paths under wsi_dir"
                )
    return out


def output_paths(h5_path: Path) -> dict[str, Path]:
    """The files written for one slide: features, rejection thumbnail, tissue contours."""
    return {
        "h5": h5_path,
        "thumbnail": h5_path.with_suffix(".jpg"),
        "tissue_geojson": h5_path.with_name(h5_path.stem + ".tissue.geojson"),
    }


def slide_provenance(
    slide_sha256: str, params: PreprocessParams, weights_sha256: str, code: str
) -> Provenance:
    """What a slide's features are computed from: its bytes, the feature parameters, weights and code."""
    return Provenance(
        stage="preprocess",
        inputs={"slide": slide_sha256},
        settings=params.cache_params(),
        code=code,
        weights=weights_sha256,
    )


def slide_subject(slide_path: Path, slide_sha256: str) -> Subject:
    """The slide an output unit is about (its resolved path and content digest)."""
    return Subject(str(Path(slide_path).resolve()), slide_sha256)


_CHECK_ATTRS = (PROVENANCE_ATTR, "stamp_orchestrated_version", "slide_sha256")


def h5_header(h5_path: Path, only: tuple[str, ...] | None = None) -> FeatureHeader | None:
    """The h5's header (:func:`stamp.features.read_feature_header`); None when it cannot be read."""
    try:
        return read_feature_header(h5_path, only)
    except FeatureFileError:
        return None


def n_tiles(header: FeatureHeader) -> int:
    """How many tiles an h5 holds, from its header."""
    return int(header.shape[0]) if header.shape else 0


def claims_outputs(h5_path: Path, slide_sha256: str) -> Callable[[Path], bool]:
    """Without a record, a file of the unit is ours when the unit's h5 carries our attributes for the
    same slide bytes (an h5 copied without its record, or written by an earlier version of ours)."""

    def claims(path: Path) -> bool:
        header = h5_header(h5_path, _CHECK_ATTRS) if not h5_path.is_symlink() else None
        if header is None:
            return False
        attrs = header.attrs
        if not (PROVENANCE_ATTR in attrs or "stamp_orchestrated_version" in attrs):
            return False
        return str(attrs.get("slide_sha256")) == slide_sha256

    return claims


def check_slide_outputs(
    slide_path: Path, h5_path: Path, expected: Provenance, digests: dict[str, str] | None = None
) -> Check:
    """:class:`stamp.provenance.Check` of a slide's outputs at ``h5_path`` against ``expected``.

    Reusable only when the unit's record matches and the h5's own ``stamp_provenance`` attribute
    carries the same key; ``digests`` (from a private cache record) must match too when given.
    """
    names = [p.name for p in output_paths(h5_path).values()]
    subject = slide_subject(slide_path, str(expected.inputs["slide"]))
    check = check_files(
        h5_path.parent,
        h5_path.name,
        names,
        expected,
        subject=subject,
        claims=claims_outputs(h5_path, str(expected.inputs["slide"])),
    )
    if not check.reusable:
        return check
    header = h5_header(h5_path, _CHECK_ATTRS)
    attrs: dict[str, Any] = header.attrs if header is not None else {}
    try:
        recorded = json.loads(str(attrs.get(PROVENANCE_ATTR)))["key"]
    except (ValueError, KeyError, TypeError):
        recorded = None
    if recorded != expected.key or header is None or not n_tiles(header):
        return Check(Verdict.STALE, f"{h5_path.name}: its own provenance attribute differs")
    if digests is not None:
        record = read_record(record_path(h5_path.parent, h5_path.name))
        if record is None or record.outputs != digests:
            return Check(Verdict.STALE, f"{h5_path.name}: files differ from the ones the cache recorded")
    return check


def recorded_outputs(h5_path: Path) -> dict[str, str]:
    """File name → sha256 of a slide's outputs as its provenance record lists them ({} without one)."""
    record = read_record(record_path(h5_path.parent, h5_path.name))
    return dict(record.outputs) if record is not None else {}


def place_finished(origin: Path, h5_path: Path, slide_path: Path, expected: Provenance) -> None:
    """Publish the finished outputs found at ``origin`` at ``h5_path`` too (a moved slide or output folder).

    The caller has checked ``origin`` against ``expected``; files are hard-linked (copied across
    file systems). Raises :class:`stamp.provenance.ForeignOutput` when ``h5_path`` holds files not ours.
    """
    staged: dict[str, Path] = {}
    try:
        for kind, dst in output_paths(h5_path).items():
            tmp = staged_file(dst)
            tmp.unlink()  # a fresh unpredictable name for the link
            try:
                os.link(output_paths(origin)[kind], tmp)
            except OSError:
                shutil.copy2(output_paths(origin)[kind], tmp)
            staged[dst.name] = tmp
        publish_files(
            h5_path.parent,
            h5_path.name,
            staged,
            expected,
            subject=slide_subject(slide_path, str(expected.inputs["slide"])),
            claims=claims_outputs(h5_path, str(expected.inputs["slide"])),
        )
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def serve_cached(report: dict[str, Any], slide_path: Path, h5_path: Path, expected: Provenance) -> str | None:
    """Why a cached task result cannot be served as it is (None: it can — placed at ``h5_path`` if needed).

    ``report`` is the cached :meth:`stamp.preprocessing.SlideReport.as_dict`; its recorded file digests
    come from the private result store and must match the files at its own path.
    """
    here = check_slide_outputs(slide_path, h5_path, expected)
    if here.reusable:
        return None
    origin = Path(report["h5"])
    if origin == h5_path:
        return here.reason
    there = check_slide_outputs(slide_path, origin, expected, digests=report.get("outputs") or None)
    if not there.reusable:
        return there.reason
    try:
        place_finished(origin, h5_path, slide_path, expected)
    except (ForeignOutput, OSError) as exc:
        return str(exc)
    return None
