"""One slide → tissue tiles → tile features → STAMP h5 (plus QC files); no Prefect here.

:func:`extract_slide` is the whole per-slide stage. Tiles come from a reader thread pool
(:mod:`stamp.slides.tiling`) through a prefetch thread, so the encoder works on full
batches while the next supertiles are being read. Tiles reach the encoder in the plan's
order and in fixed-size batches, so features (and the h5 bytes) do not depend on thread
timing. Outputs are written to temp names and published as one unit with a provenance record
(:mod:`stamp.provenance`); :func:`process_slide` reuses a slide's finished outputs only when their
record says they come from the same slide bytes, parameters, weights and code
(:func:`stamp.preprocessing.outputs.check_slide_outputs`). Part of :mod:`stamp.preprocessing`.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from tqdm import tqdm

import stamp
from stamp.features import PROVENANCE_ATTR, write_tile_features
from stamp.fileio import staged_file
from stamp.hashing import file_sha256
from stamp.logs import logger
from stamp.preprocessing.outputs import (
    check_slide_outputs,
    claims_outputs,
    h5_header,
    n_tiles,
    output_paths,
    recorded_outputs,
    slide_provenance,
    slide_subject,
)
from stamp.preprocessing.params import PreprocessParams, preprocessing_code_hash
from stamp.provenance import ForeignOutput, Provenance, Verdict, canonical_json, publish_files
from stamp.slidelock import OutputLock
from stamp.slides import SlideError, TilePlan, iter_tile_batches, open_slide, plan_tiles, resolve_mpp
from stamp.slides.qc import write_rejection_thumbnail, write_tissue_geojson
from stamp.slides.reader_base import SlideReader
from stamp.stopping import check_stop


class TileEncoder(Protocol):
    """What :func:`extract_slide` needs from an encoder (see :class:`stamp.encoders.Encoder`)."""

    name: str
    dim: int
    weights_sha256: str

    def encode(self, tiles: np.ndarray, batch_size: int | None = None) -> np.ndarray: ...


class SlideFailed(Exception):
    """A slide that cannot be processed; ``reason`` is one line for the run summary."""

    def __init__(self, slide: Path | str, reason: str) -> None:
        super().__init__(f"{Path(slide).name}: {reason}")
        self.slide, self.reason = str(slide), reason


@dataclass
class SlideReport:
    """What happened to one slide (a row of the run's artifact table and summary)."""

    slide: str
    status: str = "done"
    reason: str = ""
    h5: str | None = None
    seconds: float = 0.0
    reader: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    mpp_effective: float | None = None
    read_level: int | None = None
    tiles_total: int = 0
    tiles_kept: int = 0
    rejected_background: int = 0
    rejected_canny: int = 0
    stain_norm: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)  # file name → sha256 as published

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly)."""
        return asdict(self)


def finished_report(slide_path: Path, h5_path: Path, expected: Provenance) -> SlideReport:
    """The report of a slide whose outputs were reused (read back from the h5's attributes)."""
    header = h5_header(h5_path)
    attrs = header.attrs if header is not None else {}
    settings = expected.settings
    return SlideReport(
        slide=str(slide_path),
        status="reused",
        h5=str(h5_path),
        reader=attrs.get("reader"),
        mpp=attrs.get("slide_mpp"),
        mpp_source=attrs.get("mpp_source"),
        mpp_effective=attrs.get("mpp_effective"),
        read_level=attrs.get("read_level"),
        tiles_kept=n_tiles(header) if header is not None else 0,
        stain_norm=settings.get("stain_norm"),
        outputs=recorded_outputs(h5_path),
    )


def up_to_date_report(slide_path: Path, h5_path: Path, expected: Provenance) -> SlideReport | None:
    """The report of a slide whose outputs at ``h5_path`` are what this run would write, else None.

    Read-only and lock-free (a stage checks every slide this way before it starts any work): a unit
    another run is replacing meanwhile fails the digest check and is left to :func:`process_slide`.
    """
    if not check_slide_outputs(slide_path, h5_path, expected).reusable:
        return None
    return finished_report(slide_path, h5_path, expected)


def process_slide(
    slide_path: Path,
    h5_path: Path,
    params: PreprocessParams,
    encoder: TileEncoder,
    *,
    slide_sha256: str,
    code: str,
) -> SlideReport:
    """One slide, start to finish: reuse its outputs if their provenance matches, else compute and publish.

    Holds ``<h5>.lock`` meanwhile (another live run on the same output gets
    :class:`stamp.slidelock.SlideLocked`). An output there that we did not write, or wrote for another
    slide, fails this slide with :class:`SlideFailed` and is left alone.
    """
    expected = slide_provenance(slide_sha256, params, encoder.weights_sha256, code)
    with OutputLock(h5_path):
        check = check_slide_outputs(slide_path, h5_path, expected)
        if check.reusable:
            return finished_report(slide_path, h5_path, expected)
        if check.verdict is Verdict.FOREIGN:
            raise SlideFailed(slide_path, check.reason)
        if check.verdict is Verdict.STALE:
            logger.info("%s: computing again (%s)", slide_path.name, check.reason)
        return extract_slide(
            slide_path, h5_path, params, encoder, slide_sha256=slide_sha256, code_hash_hex=code
        )


def sample_plan_tiles(reader: SlideReader, plan: TilePlan, n: int = 64) -> np.ndarray:
    """A deterministic, evenly spread sample of up to ``n`` foreground tiles (for stain fitting)."""
    rows, cols = np.nonzero(plan.candidates)
    if len(rows) == 0:
        return np.zeros((0, plan.tile_size_px, plan.tile_size_px, 3), np.uint8)
    pick = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
    side = max(1, round(plan.tile_px0 / plan.level_downsample))
    out = []
    for i in pick:
        x0, y0 = int(cols[i] * plan.tile_px0), int(rows[i] * plan.tile_px0)
        region = reader.read_region(x0, y0, plan.level, side, side)
        out.append(cv2.resize(region, (plan.tile_size_px, plan.tile_size_px), interpolation=cv2.INTER_AREA))
    return np.stack(out)


_DONE = object()


def _counted(batches: Iterator[Any], bar: tqdm) -> Iterator[Any]:
    """Pass batches through, advancing the per-slide progress bar by each supertile's candidates."""
    for batch in batches:
        bar.update(len(batch))
        yield batch


def _prefetch(batches: Iterator[Any], depth: int) -> Generator[Any, None, None]:
    """Run ``batches`` in a background thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="stamp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


def _encode_stream(
    batches: Iterator[Any], encoder: TileEncoder, batch_size: int, normalize: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Encode a stream of TileBatch in fixed-size chunks; return (feats, coords) in stream order."""
    feats: list[np.ndarray] = []
    coords: list[np.ndarray] = []
    buf_t: list[np.ndarray] = []
    buf_c: list[np.ndarray] = []
    buffered = 0

    def flush(force: bool) -> None:
        nonlocal buf_t, buf_c, buffered
        if not buffered:
            return
        tiles, cs = np.concatenate(buf_t), np.concatenate(buf_c)
        n = len(tiles) if force else (len(tiles) // batch_size) * batch_size
        if n == 0:
            return
        chunk = normalize(tiles[:n]) if normalize is not None else tiles[:n]
        feats.append(encoder.encode(chunk, batch_size=batch_size))
        coords.append(cs[:n])
        buf_t, buf_c, buffered = [tiles[n:]], [cs[n:]], len(tiles) - n

    for batch in batches:
        check_stop()  # SIGTERM / a cancelled run stops between batches
        buf_t.append(batch.tiles)
        buf_c.append(batch.coords_um)
        buffered += len(batch)
        if buffered >= batch_size:
            flush(force=False)
    flush(force=True)
    if not feats:
        return np.zeros((0, encoder.dim), np.float16), np.zeros((0, 2), np.float32)
    return np.concatenate(feats), np.concatenate(coords)


def extract_slide(
    slide_path: Path,
    h5_path: Path,
    params: PreprocessParams,
    encoder: TileEncoder,
    *,
    slide_sha256: str | None = None,
    code_hash_hex: str | None = None,
) -> SlideReport:
    """Tile, filter, (stain-normalise,) encode one slide and write its h5 + QC files.

    Raises :class:`SlideFailed` with a one-line reason for anything wrong with the slide
    (unreadable, no mpp, no tissue, read error, an output there that is not ours); nothing is
    left at ``h5_path`` then. The three files are published as one unit with their provenance.
    """
    start = time.perf_counter()
    check_stop()
    report = SlideReport(slide=str(slide_path), stain_norm=params.stain_norm)
    code = code_hash_hex or preprocessing_code_hash()
    digest = slide_sha256 or file_sha256(slide_path)
    expected = slide_provenance(digest, params, encoder.weights_sha256, code)
    paths = output_paths(h5_path)
    staged = {kind: staged_file(p) for kind, p in paths.items()}
    try:
        _extract(slide_path, params, encoder, report, staged, expected, code)
        publish_files(
            h5_path.parent,
            h5_path.name,
            {paths[k].name: staged[k] for k in ("h5", "thumbnail", "tissue_geojson")},
            expected,
            subject=slide_subject(slide_path, digest),
            claims=claims_outputs(h5_path, digest),
        )
    except ForeignOutput as exc:
        raise SlideFailed(slide_path, str(exc)) from exc
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    report.outputs = recorded_outputs(h5_path)
    report.h5 = str(h5_path)
    report.seconds = time.perf_counter() - start
    return report


def _extract(
    slide_path: Path,
    params: PreprocessParams,
    encoder: TileEncoder,
    report: SlideReport,
    staged: dict[str, Path],
    expected: Provenance,
    code: str,
) -> None:
    """Compute the slide's features and QC files into the ``staged`` temp files."""
    try:
        reader = open_slide(slide_path, params.reader)
    except SlideError as exc:
        raise SlideFailed(slide_path, exc.reason) from exc
    with reader:
        report.reader = reader.name
        try:
            mpp, source = resolve_mpp(reader, params.default_slide_mpp)
        except SlideError as exc:
            raise SlideFailed(slide_path, exc.reason) from exc
        report.mpp, report.mpp_source = mpp, source
        plan = plan_tiles(reader, mpp, params.tiling)
        report.mpp_effective, report.read_level = plan.mpp_effective, plan.level
        normalize, stain_params = _stain(reader, plan, params, slide_path)
        batches = iter_tile_batches(reader, plan, params.tiling)
        try:
            bar = tqdm(
                total=plan.n_candidates,
                desc=slide_path.name,
                unit="tile",
                leave=False,
                disable=not sys.stderr.isatty(),
            )
            with bar, closing(_prefetch(_counted(batches, bar), depth=4)) as stream:
                # closing: on any exit (a stop request too) the prefetch thread is stopped and joined
                # before the reader threads and the slide are closed (OpenSlide aborts otherwise)
                feats, coords = _encode_stream(stream, encoder, params.batch_size, normalize)
        except SlideError as exc:
            raise SlideFailed(slide_path, exc.reason) from exc
        finally:
            batches.close()
        stats = batches.stats
        report.tiles_total, report.tiles_kept = stats.tiles_total, stats.kept
        report.rejected_background, report.rejected_canny = stats.rejected_background, stats.rejected_canny
        if len(coords) == 0:
            raise SlideFailed(slide_path, stats.no_tissue_reason())
        write_rejection_thumbnail(reader, plan, coords, staged["thumbnail"])
        write_tissue_geojson(plan.tissue_mask, plan.thumb_downsample, staged["tissue_geojson"])
    attrs: dict[str, Any] = {
        "slide_sha256": expected.inputs["slide"],
        "weights_sha256": encoder.weights_sha256,
        "config_sha256": params.digest(),
        "reader": report.reader,
        "mpp_source": source,
        "stain_norm": params.stain_norm or "none",
        "stain_params": json.dumps(stain_params) if stain_params else None,
        "stamp_orchestrated_version": stamp.__version__,
        PROVENANCE_ATTR: canonical_json({"key": expected.key, **expected.as_dict()}),
        **{k: v for k, v in plan.describe().items() if k not in ("tile_size_um", "tile_size_px")},
    }
    write_tile_features(
        staged["h5"],
        feats,
        coords,
        extractor=encoder.name,
        tile_size_um=params.tiling.tile_size_um,
        tile_size_px=params.tiling.tile_size_px,
        code_hash=code[:8],
        extra_attrs=attrs,
    )
    logger.debug("%s: %s", slide_path.name, stats.summary())


def _stain(reader: SlideReader, plan: TilePlan, params: PreprocessParams, slide: Path) -> tuple[Any, Any]:
    """Fit the slide's stain normaliser once (on a tile sample); return (transform fn, params)."""
    if not params.stain_norm:
        return None, None
    from stamp.slides.stain import fit_slide_params, get_normalizer

    normalizer = get_normalizer(params.stain_norm)
    if normalizer is None:
        return None, None
    fitted = fit_slide_params(normalizer, sample_plan_tiles(reader, plan), slide=str(slide))
    if fitted is None:  # too little tissue to fit: warned, features without normalisation
        return None, None
    return (lambda tiles: normalizer.transform(tiles, fitted)), fitted
