"""Slide readers behind one small interface: OpenSlide first, tifffile for TIFFs OpenSlide refuses.

Conventions shared by every reader:

* ``read_region(x, y, level, w, h)`` takes the origin ``(x, y)`` in **level-0 pixels** (OpenSlide's
  convention) and a size ``(w, h)`` in pixels **of ``level``**; it returns RGB ``uint8`` ``(h, w, 3)``.
* Transparent pixels and everything outside the image are composited over **white** (255). STAMP
  reads OpenSlide's RGBA and drops alpha, which pads with black; white makes padding read as
  background, so it neither passes the brightness test nor adds Canny edges at the slide border.
* Readers are safe to share between threads: OpenSlide handles are thread-safe; the tifffile
  reader serialises file access with a lock and decodes segments outside it (imagecodecs releases
  the GIL), keeping a small LRU cache of decoded segments.
* ``open_slide(path, reader="auto")`` tries OpenSlide and falls back to tifffile only when OpenSlide
  cannot open the file (or sees one level of a TIFF whose SubIFD pyramid tifffile sees). An
  explicit ``"openslide"`` / ``"tifffile"`` is authoritative: its failure is the error, no fallback.
  ``"fast"`` is ``auto`` plus one step: when OpenSlide identifies an Aperio / generic TIFF whose
  pyramid tifffile exposes identically (raw/LZW/JPEG/deflate tiles), pixels are decoded by tifffile,
  which measured 4-6x faster than OpenSlide here (same pixels). ``reader.name`` records what was
  used and ``reader.note`` why.

Layout: this module chooses and opens a reader. :mod:`~stamp.slides.reader_base` holds the errors,
the :class:`~stamp.slides.reader_base.SlideReader` base class and pixel helpers;
:mod:`~stamp.slides.reader_openslide` and :mod:`~stamp.slides.reader_tifffile` the readers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np

from stamp.slides.reader_base import SlideOpenError, SlideReader
from stamp.slides.reader_openslide import OpenSlideReader
from stamp.slides.reader_tifffile import TiffFileReader

__all__ = ["READER_NAMES", "ReaderName", "check_tiff_integrity", "open_slide"]

_logger = logging.getLogger("stamp")

ReaderName = Literal["auto", "openslide", "tifffile", "fast"]
READER_NAMES: tuple[str, ...] = ("auto", "openslide", "tifffile", "fast")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


# --------------------------------------------------------------------------- integrity + opening


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def check_tiff_integrity(path: Path, max_pages: int = 512) -> str | None:
    """A reason string if a TIFF-based file is truncated/corrupt, else ``None``.

    Cheap: parses the IFDs only and checks that every image segment lies inside the file, which
    catches truncated downloads/copies before any pixel is decoded. Non-TIFF files pass.
    """
    if not _is_tiff(path):
        return None
    import tifffile

    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(str(path)) as tif:
            for i, page in enumerate(tif.pages):
                if i >= max_pages:
                    break
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    return f"truncated/corrupt: image data of page {i} extends past the end of the file ({size} bytes)"
    except Exception as e:
        return f"truncated/corrupt: {type(e).__name__}: {e}"
    return None


def _open_openslide(path: Path) -> OpenSlideReader:
    import openslide

    try:
        return OpenSlideReader(path)
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideOpenError(path, "not a format OpenSlide can read") from e
    except openslide.OpenSlideError as e:
        raise SlideOpenError(path, f"truncated/corrupt: OpenSlide: {e}") from e


def _open_tifffile(path: Path) -> TiffFileReader:
    if not _is_tiff(path):
        raise SlideOpenError(path, "not a TIFF file (tifffile reads TIFF / OME-TIFF only)")
    try:
        return TiffFileReader(path)
    except ValueError as e:
        if "unsupported" in str(e):
            raise SlideOpenError(path, str(e)) from e
        raise SlideOpenError(path, f"truncated/corrupt: tifffile: {e}") from e
    except Exception as e:
        raise SlideOpenError(path, f"truncated/corrupt: tifffile: {type(e).__name__}: {e}") from e


def _tifffile_pyramid_depth(path: Path) -> int:
    """How many pyramid levels tifffile sees in series 0 (0 if it cannot parse the file)."""
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return len(tif.series[0].levels)
    except Exception:
        return 0


def open_slide(path: Path | str, reader: ReaderName | str = "auto") -> SlideReader:
    """Open a slide. ``reader``: ``auto`` (OpenSlide, else tifffile), ``openslide``, ``tifffile`` or
    ``fast`` (``auto``, decoding OpenSlide-identified Aperio/generic TIFF with tifffile; module docs).

    Raises :class:`SlideOpenError` with a one-line reason: ``file not found``, ``not a slide
    OpenSlide or tifffile can read``, ``truncated/corrupt: …``, ``unsupported TIFF layout …``.
    """
    path = Path(path)
    if reader not in READER_NAMES:
        raise ValueError(f"unknown slide reader {reader!r}; choose one of {', '.join(READER_NAMES)}")
    if not path.exists():
        raise SlideOpenError(path, "file not found")
    if path.is_dir():
        raise SlideOpenError(path, "is a directory, not a slide file")
    if path.stat().st_size == 0:
        raise SlideOpenError(path, "truncated/corrupt: empty file")

    integrity = check_tiff_integrity(path)
    if reader == "openslide":
        try:
            opened: SlideReader = _open_openslide(path)
        except SlideOpenError as e:
            if integrity:
                raise SlideOpenError(path, integrity) from e
            raise
        if integrity:
            opened.close()
            raise SlideOpenError(path, integrity)
        return opened
    if reader == "tifffile":
        if integrity:
            raise SlideOpenError(path, integrity)
        return _open_tifffile(path)

    # auto / fast
    try:
        os_reader = _open_openslide(path)
    except SlideOpenError as os_err:
        if integrity:
            raise SlideOpenError(path, integrity) from os_err
        if not _is_tiff(path):
            if os_err.reason.startswith("truncated/corrupt"):
                raise
            raise SlideOpenError(path, "not a slide OpenSlide or tifffile can read") from os_err
        try:
            tf_reader = _open_tifffile(path)
        except SlideOpenError as tf_err:
            if os_err.reason.startswith("truncated/corrupt"):
                raise os_err from tf_err
            if tf_err.reason.startswith("unsupported"):
                raise SlideOpenError(
                    path, f"OpenSlide cannot read it and tifffile: {tf_err.reason}"
                ) from tf_err
            raise SlideOpenError(path, "not a slide OpenSlide or tifffile can read") from tf_err
        tf_reader.note = f"OpenSlide refused it ({os_err.reason}); read with tifffile"
        _logger.info("%s: %s", path, tf_reader.note)
        return tf_reader
    if integrity:
        os_reader.close()
        raise SlideOpenError(path, integrity)
    # OpenSlide ignores SubIFD pyramids (OME-TIFF): prefer tifffile when it sees more levels.
    if (
        os_reader.vendor == "generic-tiff"
        and os_reader.level_count == 1
        and _tifffile_pyramid_depth(path) > 1
    ):
        try:
            tf_reader = _open_tifffile(path)
        except SlideOpenError:
            return os_reader
        if tf_reader.dimensions == os_reader.dimensions and tf_reader.level_count > 1:
            os_reader.close()
            tf_reader.note = f"OpenSlide sees 1 level, tifffile sees {tf_reader.level_count} (SubIFD pyramid); read with tifffile"
            _logger.info("%s: %s", path, tf_reader.note)
            return tf_reader
        tf_reader.close()
    if reader == "fast":
        return _faster_equivalent(os_reader)
    return os_reader


# TIFF compressions whose tifffile/imagecodecs decode matches OpenSlide's: none, LZW, JPEG, deflate.
_FAST_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})


def _faster_equivalent(os_reader: OpenSlideReader) -> SlideReader:
    """For ``reader="fast"``: the tifffile reader when it exposes exactly OpenSlide's pyramid.

    Only Aperio / generic TIFF with raw, LZW, JPEG or deflate tiles qualify; OpenSlide's properties
    are kept (so MPP resolution is unchanged). Anything else stays with OpenSlide.
    """
    if os_reader.vendor not in ("aperio", "generic-tiff"):
        return os_reader
    try:
        tf_reader = TiffFileReader(os_reader.path)
    except Exception:
        return os_reader
    n = os_reader.level_count
    same = tf_reader.level_dimensions[:n] == os_reader.level_dimensions and all(
        lv.segmentable and int(lv.page.compression) in _FAST_COMPRESSIONS for lv in tf_reader._levels[:n]
    )
    if not same:
        tf_reader.close()
        return os_reader
    tf_reader.level_dimensions = os_reader.level_dimensions
    tf_reader.level_downsamples = os_reader.level_downsamples
    tf_reader._levels = tf_reader._levels[:n]
    tf_reader.properties = MappingProxyType({**tf_reader.properties, **os_reader.properties})
    tf_reader.note = (
        f"OpenSlide identified it ({os_reader.vendor}); pixels decoded with tifffile (reader=fast)"
    )
    os_reader.close()
    return tf_reader
