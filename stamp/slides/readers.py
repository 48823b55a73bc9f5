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
"""

from __future__ import annotations

import abc
import ctypes
import logging
import math
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import cv2
import numpy as np

_logger = logging.getLogger("stamp")

ReaderName = Literal["auto", "openslide", "tifffile", "fast"]
READER_NAMES: tuple[str, ...] = ("auto", "openslide", "tifffile", "fast")

# A whole level is read in one call below this many pixels; above, thumbnails are built blockwise.
_WHOLE_LEVEL_READ_PX = 16 * 2**20
_BLOCK_PX = 2048
# Decoded-segment cache of the tifffile reader.
_SEGMENT_CACHE_BYTES = 96 * 2**20
# A level whose full image is not tiled/stripped in a way we decode per segment is loaded whole,
# but only up to this size.
_MAX_WHOLE_LEVEL_BYTES = 2 * 2**30
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideError(Exception):
    """A problem with one slide; ``reason`` is a one-line message for the user."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class SlideOpenError(SlideError):
    """The slide could not be opened (missing, not a slide, truncated/corrupt, unsupported layout)."""


class SlideReadError(SlideError):
    """Reading pixels failed after the slide was opened (typically a truncated or corrupt tile)."""


# --------------------------------------------------------------------------- compositing helpers


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA over white → RGB uint8 (contiguous)."""
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _premultiplied_bgra_over_white(bgra: np.ndarray) -> np.ndarray:
    """OpenSlide's native buffer (premultiplied ARGB words = B, G, R, A bytes) over white → RGB.

    Over white, premultiplied colour c' = c·a/255 composites to c' + (255 − a): exact for any alpha.
    """
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    alpha = cv2.extractChannel(bgra, 3)
    if cv2.minMaxLoc(alpha)[0] < 255:
        rgb = cv2.add(rgb, cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2RGB))
    return rgb


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Normalise a decoded (h, w[, s]) array of any common dtype to RGB uint8."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        else:
            raise ValueError(f"unsupported sample type {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    samples = arr.shape[2]
    if samples == 1:
        return np.repeat(arr, 3, axis=2)
    if samples == 3:
        return arr
    if samples == 4:
        return _over_white(arr)
    raise ValueError(f"unsupported number of samples per pixel: {samples}")


# --------------------------------------------------------------------------- base class


class SlideReader(abc.ABC):
    """A whole-slide image opened for reading. Use as a context manager or call :meth:`close`."""

    name: str = "base"

    def __init__(
        self,
        path: Path,
        level_dimensions: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
        properties: Mapping[str, str],
    ) -> None:
        self.path = Path(path)
        self.level_dimensions = level_dimensions
        self.level_downsamples = level_downsamples
        self.properties: Mapping[str, str] = MappingProxyType(dict(properties))
        self.note = ""  # why this reader was chosen when ``auto`` fell back
        self._level_cache: tuple[int, np.ndarray] | None = None

    # ----------------------------------------------------------------- geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    # ----------------------------------------------------------------- pixels
    @abc.abstractmethod
    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """Reader-specific read; same contract as :meth:`read_region`."""

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) from ``level``, origin (x, y) in level-0 px; outside → white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range (slide has {self.level_count})")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        return self._read(int(x), int(y), int(level), int(w), int(h))

    def whole_level(self, level: int) -> np.ndarray:
        """The whole of a level as RGB. The last one read (if ≤ 16 Mpx) is kept, read-only, for reuse:
        planning reads the same coarse level for the thumbnail and the brightness test."""
        cached = self._level_cache
        if cached is not None and cached[0] == level:
            return cached[1]
        lw, lh = self.level_dimensions[level]
        img = self.read_region(0, 0, level, lw, lh)
        if lw * lh <= _WHOLE_LEVEL_READ_PX:
            img.setflags(write=False)  # shared with later callers
            self._level_cache = (level, img)
        return img

    def downsampled(self, width: int, height: int) -> np.ndarray:
        """The whole slide resized to exactly (width, height) RGB, area-averaged from a pyramid level.

        Memory stays bounded on big single-level images: the chosen level is reduced blockwise
        by an integer factor first, then resized once.
        """
        width, height = max(1, int(width)), max(1, int(height))
        w0, h0 = self.dimensions
        level = self.level_for_downsample(min(w0 / width, h0 / height))
        lw, lh = self.level_dimensions[level]
        if lw * lh <= _WHOLE_LEVEL_READ_PX:
            img = self.whole_level(level)
        else:
            k = max(1, int(min(lw / width, lh / height)))
            pref_w, pref_h = self._block_shape(level)
            block_w, block_h = max(k, (pref_w // k) * k), max(k, (pref_h // k) * k)
            iw, ih = math.ceil(lw / k), math.ceil(lh / k)
            img = np.full((ih, iw, 3), 255, np.uint8)
            ds = self.level_downsamples[level]
            for by in range(0, lh, block_h):
                for bx in range(0, lw, block_w):
                    bw, bh = min(block_w, lw - bx), min(block_h, lh - by)
                    # read whole multiples of k so each output pixel averages k×k level pixels
                    rw, rh = math.ceil(bw / k) * k, math.ceil(bh / k) * k
                    part = self.read_region(round(bx * ds), round(by * ds), level, rw, rh)
                    if k > 1:
                        part = cv2.resize(part, (rw // k, rh // k), interpolation=cv2.INTER_AREA)
                    oy, ox = by // k, bx // k
                    img[oy : oy + part.shape[0], ox : ox + part.shape[1]] = part[: ih - oy, : iw - ox]
        if img.shape[1] == width and img.shape[0] == height:
            return img.copy()
        interp = cv2.INTER_AREA if img.shape[1] >= width else cv2.INTER_LINEAR
        return cv2.resize(img, (width, height), interpolation=interp)

    def _block_shape(self, level: int) -> tuple[int, int]:
        """Preferred (width, height) of blockwise reads of a level (see :meth:`downsampled`)."""
        return _BLOCK_PX, _BLOCK_PX

    def thumbnail(self, max_size: int) -> np.ndarray:
        """RGB thumbnail whose longer side is ``max_size`` (never larger than level 0)."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        return self.downsampled(max(1, round(w0 * scale)), max(1, round(h0 * scale)))

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the file handle."""
        self._level_cache = None
        self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """Reader-specific close."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"<{type(self).__name__} {self.path.name} {w}x{h} levels={self.level_count}>"


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideReader(SlideReader):
    """OpenSlide (``openslide-python`` + ``openslide-bin``): all vendor formats it supports."""

    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self._openslide = openslide
        self._slide = openslide.OpenSlide(str(path))
        # Fast path: OpenSlide's C read into a numpy buffer, converted with cv2 (skips PIL and two
        # copies; ~1.5x faster). Uses openslide-python internals, so it falls back when they change.
        self._c_read = getattr(openslide.lowlevel, "_read_region", None)
        self._handle = getattr(self._slide, "_osr", None)
        self._fast = self._c_read is not None and self._handle is not None and sys.byteorder == "little"
        super().__init__(
            path,
            tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            tuple(float(d) for d in self._slide.level_downsamples),
            dict(self._slide.properties),
        )

    @property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", "")

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        try:
            if self._fast and self._c_read is not None:
                buf = np.empty((h, w), np.uint32)
                self._c_read(
                    self._handle, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, level, w, h
                )
                return _premultiplied_bgra_over_white(buf.view(np.uint8).reshape(h, w, 4))
            img = self._slide.read_region((x, y), level, (w, h))
        except self._openslide.OpenSlideError as e:
            raise SlideReadError(self.path, f"truncated/corrupt: OpenSlide failed to read pixels: {e}") from e
        return _over_white(np.asarray(img))

    def _close(self) -> None:
        self._slide.close()


# --------------------------------------------------------------------------- tifffile


class _Level:
    """One pyramid level of a TIFF: either segment-decodable page or a fully loaded array."""

    def __init__(self, page: Any, shape: tuple[int, ...], axes: str, loader: Any) -> None:
        self.page = page
        self.height, self.width = int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        self.axes = axes
        self._loader = loader  # callable returning the whole level as an array (fallback path)
        self.array: np.ndarray | None = None
        segmentable = (
            page is not None
            and axes in ("YXS", "YX")
            and page.planarconfig == 1
            and page.imagedepth == 1
            and (page.is_tiled or page.rowsperstrip > 0)
            and int(page.imagewidth) == self.width
            and int(page.imagelength) == self.height
        )
        self.segmentable = bool(segmentable)
        if self.segmentable:
            if page.is_tiled:
                self.seg_w, self.seg_h = int(page.tilewidth), int(page.tilelength)
            else:
                self.seg_w, self.seg_h = self.width, min(int(page.rowsperstrip), self.height)
            self.segs_across = math.ceil(self.width / self.seg_w)
            self.n_segments = len(page.dataoffsets)


class TiffFileReader(SlideReader):
    """tifffile + imagecodecs: pyramidal (pages or SubIFDs) or single-level TIFF / OME-TIFF."""

    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(str(path))
        try:
            levels, props = self._discover(self._tif)
        except Exception:
            self._tif.close()
            raise
        self._levels = levels
        self._file_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = 0
        # Strip-organised levels: keep at least two bands of full-width strips (a supertile row)
        # so neighbouring supertiles do not decode the same strips again.
        band = max(
            (
                2 * lv.width * (1024 + 2 * lv.seg_h) * 3
                for lv in levels
                if lv.segmentable and lv.seg_w == lv.width
            ),
            default=0,
        )
        self._cache_budget = max(_SEGMENT_CACHE_BYTES, band)
        w0, h0 = levels[0].width, levels[0].height
        dims = tuple((lv.width, lv.height) for lv in levels)
        downs = tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in levels)
        super().__init__(path, dims, downs, props)

    @staticmethod
    def _discover(tif: Any) -> tuple[list[_Level], dict[str, str]]:
        series = tif.series[0]
        axes = series.axes
        if axes not in ("YXS", "YX"):
            # (tifffile already squeezes singleton axes; multi-channel / z / time stacks are not slides)
            raise ValueError(f"unsupported TIFF layout (axes {axes!r}, shape {series.shape})")
        if axes == "YXS" and series.shape[-1] not in (1, 3, 4):
            raise ValueError(f"unsupported number of samples per pixel: {series.shape[-1]}")
        levels: list[_Level] = []
        for lv in series.levels:
            page = lv.pages[0] if len(lv.pages) == 1 else None
            levels.append(_Level(page, tuple(lv.shape), lv.axes, lv.asarray))
        if len(levels) == 1:
            levels.extend(TiffFileReader._extra_levels(tif, levels[0]))
        page0 = series.pages[0] if series.pages else tif.pages[0]
        props: dict[str, str] = {"tifffile.series": str(series.kind)}
        if page0.description:
            props["tiff.ImageDescription"] = str(page0.description)
        for tag_name, key in (("XResolution", "tiff.XResolution"), ("YResolution", "tiff.YResolution")):
            tag = page0.tags.get(tag_name)
            if tag is not None:
                num, den = tag.value
                if den:
                    props[key] = repr(num / den)
        unit = page0.tags.get("ResolutionUnit")
        if unit is not None:
            props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(int(unit.value), "")
        return levels, props

    @staticmethod
    def _extra_levels(tif: Any, base: _Level) -> list[_Level]:
        """Reduced-resolution tiled top-level pages that tifffile did not group into the series.

        (e.g. an Aperio-style file without the thumbnail page, whose second level tifffile then
        takes for the thumbnail). A page qualifies if it is tiled, has the same samples, a smaller
        size and the aspect ratio of level 0 (height within 1 % or 1.5 px of the width's scale).
        """
        extra: list[_Level] = []
        ref = base.page
        if ref is None:
            return extra
        for page in tif.pages[1:64]:
            if not getattr(page, "is_tiled", False) or page.samplesperpixel != ref.samplesperpixel:
                continue
            w, h = int(page.imagewidth), int(page.imagelength)
            if w >= base.width or h >= base.height:
                continue
            expected_h = base.height * w / base.width
            if abs(h - expected_h) > max(1.5, 0.01 * expected_h):
                continue
            axes = "YXS" if page.samplesperpixel > 1 else "YX"
            shape = (h, w, page.samplesperpixel) if axes == "YXS" else (h, w)
            extra.append(_Level(page, shape, axes, page.asarray))
        extra.sort(key=lambda lv: -lv.width)
        return extra

    def _block_shape(self, level: int) -> tuple[int, int]:
        lv = self._levels[level]
        if lv.segmentable and lv.seg_w == lv.width and lv.width > _BLOCK_PX:
            # strips span the full width: read full-width bands so each strip is decoded once
            return lv.width + 1, max(lv.seg_h, _BLOCK_PX * _BLOCK_PX // lv.width)
        return _BLOCK_PX, _BLOCK_PX

    # ----------------------------------------------------------------- segments
    def _segment(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        with self._cache_lock:
            seg = self._cache.get(key)
            if seg is not None or key in self._cache:
                self._cache.move_to_end(key)
                return seg
        lv = self._levels[level]
        page = lv.page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0 or offset == 0:
            seg = None
        else:
            with self._file_lock:
                fh = self._tif.filehandle
                fh.seek(offset)
                data = fh.read(count)
            if len(data) != count:
                raise SlideReadError(
                    self.path, f"truncated/corrupt: segment {index} of level {level} is cut off"
                )
            kwargs: dict[str, Any] = {"_fullsize": bool(page.is_tiled)}
            if page.compression in (6, 7, 34892, 33007):
                kwargs["jpegtables"] = page.jpegtables
                kwargs["jpegheader"] = page.jpegheader
            try:
                arr, _, _ = page.decode(data, index, **kwargs)
            except Exception as e:
                raise SlideReadError(
                    self.path, f"truncated/corrupt: cannot decode segment {index}: {e}"
                ) from e
            seg = None if arr is None else _to_rgb_uint8(arr[0])
        with self._cache_lock:
            self._cache[key] = seg
            self._cache_bytes += 0 if seg is None else seg.nbytes
            while self._cache_bytes > self._cache_budget and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= 0 if old is None else old.nbytes
        return seg

    def _whole_level(self, level: int) -> np.ndarray:
        lv = self._levels[level]
        if lv.array is None:
            with self._file_lock:
                if lv.array is None:
                    nbytes = lv.width * lv.height * 4
                    if nbytes > _MAX_WHOLE_LEVEL_BYTES:
                        raise SlideReadError(
                            self.path,
                            f"unsupported TIFF layout for region reads (axes {lv.axes!r}) at this size",
                        )
                    try:
                        arr = np.asarray(lv._loader())
                    except Exception as e:
                        raise SlideReadError(self.path, f"truncated/corrupt: {e}") from e
                    if lv.axes not in ("YXS", "YX"):
                        raise SlideReadError(self.path, f"unsupported TIFF layout (axes {lv.axes!r})")
                    lv.array = _to_rgb_uint8(arr)
        assert lv.array is not None
        return lv.array

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        lx, ly = round(x / ds), round(y / ds)
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return out
        if not lv.segmentable:
            arr = self._whole_level(level)
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = arr[y0:y1, x0:x1]
            return out
        sw, sh = lv.seg_w, lv.seg_h
        for ty in range(y0 // sh, (y1 - 1) // sh + 1):
            for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                index = ty * lv.segs_across + tx
                if index >= lv.n_segments:
                    raise SlideReadError(self.path, f"truncated/corrupt: level {level} lacks segment {index}")
                seg = self._segment(level, index)
                if seg is None:
                    continue
                # intersection of the segment with the requested window, in level pixels
                sx0, sy0 = tx * sw, ty * sh
                ix0, iy0 = max(x0, sx0), max(y0, sy0)
                ix1 = min(x1, sx0 + seg.shape[1], lv.width)
                iy1 = min(y1, sy0 + seg.shape[0], lv.height)
                if ix0 >= ix1 or iy0 >= iy1:
                    continue
                out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx] = seg[
                    iy0 - sy0 : iy1 - sy0, ix0 - sx0 : ix1 - sx0
                ]
        return out

    def _close(self) -> None:
        self._tif.close()
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0


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
