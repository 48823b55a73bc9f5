"""tifffile reader: pyramidal (pages or SubIFDs) or single-level TIFF / OME-TIFF.

Decodes tiles/strips itself with imagecodecs (outside the file lock, which releases the GIL) and
keeps a small LRU cache of decoded segments, so one reader is safe and fast to share between threads.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from stamp.slides import reader_base
from stamp.slides.reader_base import SlideReader, SlideReadError, to_rgb_uint8

# Decoded-segment cache of the tifffile reader.
_SEGMENT_CACHE_BYTES = 96 * 2**20
# A level whose full image is not tiled/stripped in a way we decode per segment is loaded whole,
# but only up to this size.
_MAX_WHOLE_LEVEL_BYTES = 2 * 2**30


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
        if lv.segmentable and lv.seg_w == lv.width and lv.width > reader_base.BLOCK_PX:
            # strips span the full width: read full-width bands so each strip is decoded once
            return lv.width + 1, max(lv.seg_h, reader_base.BLOCK_PX * reader_base.BLOCK_PX // lv.width)
        return reader_base.BLOCK_PX, reader_base.BLOCK_PX

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
            seg = None if arr is None else to_rgb_uint8(arr[0])
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
                    lv.array = to_rgb_uint8(arr)
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
