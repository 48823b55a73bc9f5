"""Shared core of the slide readers: errors, the :class:`SlideReader` base class, pixel helpers.

The concrete readers (:mod:`stamp.slides.reader_openslide`, :mod:`stamp.slides.reader_tifffile`)
build on this module; :mod:`stamp.slides.readers` chooses and opens a reader (``open_slide``).
The reading conventions are documented there.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np

# A whole level is read in one call below this many pixels; above, thumbnails are built blockwise.
WHOLE_LEVEL_READ_PX = 16 * 2**20
BLOCK_PX = 2048


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


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight (non-premultiplied) RGBA over white → RGB uint8 (contiguous)."""
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def premultiplied_bgra_over_white(bgra: np.ndarray) -> np.ndarray:
    """OpenSlide's native buffer (premultiplied ARGB words = B, G, R, A bytes) over white → RGB.

    Over white, premultiplied colour c' = c·a/255 composites to c' + (255 − a): exact for any alpha.
    """
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    alpha = cv2.extractChannel(bgra, 3)
    if cv2.minMaxLoc(alpha)[0] < 255:
        rgb = cv2.add(rgb, cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2RGB))
    return rgb


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
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
        return over_white(arr)
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
        if lw * lh <= WHOLE_LEVEL_READ_PX:
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
        if lw * lh <= WHOLE_LEVEL_READ_PX:
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
        return BLOCK_PX, BLOCK_PX

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
