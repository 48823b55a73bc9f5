"""Shared pieces of the stain normalisers (see :mod:`stamp.slides.stain`, the public front).

Holds what both :mod:`stamp.slides.stain_macenko` and :mod:`stamp.slides.stain_reinhard` need:
the parameter types, the bundled reference targets, the fitting defaults,
:class:`StainFitError`, the deterministic tile / pixel sampling and small array helpers. It
imports neither implementation, so there are no import cycles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

import cv2
import numpy as np

SlideStainParams: TypeAlias = dict[str, Any]
"""JSON-serialisable per-slide parameters; ``params["method"]`` names the normaliser."""

TileInput: TypeAlias = np.ndarray | Sequence[np.ndarray]

PARAMS_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------
# Bundled reference targets (numbers, not images).
#
# Macenko: the H&E reference stain matrix (unit OD vectors in R, G, B order; haematoxylin
# first) and the reference pseudo-maximum (99th percentile) stain concentrations. These are the
# widely used default target of Macenko normalisation (they go back to an early public MATLAB
# implementation of the method and are used by most later re-implementations). They were
# obtained with natural-log OD and I0 = 240; we use natural-log OD with I0 = 255 (so that white
# maps exactly to OD 0), a constant 0.06 OD difference that only slightly changes the target's
# contrast.
MACENKO_REFERENCE_STAINS: Final[tuple[tuple[float, float, float], tuple[float, float, float]]] = (
    (0.5626, 0.7201, 0.4062),  # haematoxylin
    (0.2159, 0.8012, 0.5581),  # eosin
)
MACENKO_REFERENCE_MAX_CONCENTRATIONS: Final[tuple[float, float]] = (1.9705, 1.0308)

# Reinhard: mean and standard deviation of the tissue pixels of a typical H&E image in float
# CIELAB units (D65; L* in [0, 100], a* and b* signed, i.e. OpenCV's 8-bit Lab with
# L = L8 * 100 / 255, a = a8 - 128, b = b8 - 128). No public image is shipped, so the values are
# *derived from the Macenko reference above*: an H&E rendering with the reference stains whose
# H and E concentrations are independent and exponentially distributed with their 99th
# percentile at the reference maxima (a common shape of stain-concentration histograms),
# measured on its tissue pixels (L* < REINHARD_TISSUE_MAX_LIGHTNESS) exactly like a slide is
# measured in ReinhardNormalizer.fit. ``derive_reinhard_reference()`` (in
# :mod:`stamp.slides.stain_reinhard`) recomputes them (the tests check it). The result (L* 65,
# a* +19, b* -12) is a typical pink-purple H&E look; both bundled targets thus describe the
# same reference appearance. Use ``fit_target(image)`` for a lab-specific target.
REINHARD_REFERENCE_MEAN: Final[tuple[float, float, float]] = (65.31, 19.37, -12.04)
REINHARD_REFERENCE_STD: Final[tuple[float, float, float]] = (14.43, 6.66, 5.84)

DEFAULT_MAX_FIT_TILES: Final = 64
"""At most this many tiles of a slide are used to fit its parameters."""

DEFAULT_MAX_FIT_PIXELS: Final = 1 << 21
"""At most this many pixels (deterministic stride over the sampled tiles) enter a fit."""

DEFAULT_MIN_TISSUE_PIXELS: Final = 5_000
"""Fewer tissue pixels than this in the sample -> :class:`StainFitError`."""

# Pixels whose channels are all <= this are treated as black padding (edge tiles that extend
# beyond the slide are padded black) and ignored when fitting.
_BLACK_MAX: Final = 5

I0: Final = 255.0  # transmitted (background) light intensity for 8-bit images
# Transforms work on chunks of this many pixels (measured fastest). Not Final: the
# implementations read it at call time as ``stain_common.CHUNK_PIXELS``, so tests can
# monkeypatch it here to check that chunking does not change the output.
CHUNK_PIXELS = 1 << 18


class StainFitError(ValueError):
    """Stain parameters cannot be fitted for a slide (too little tissue, degenerate colours).

    The caller should skip stain normalisation for that slide and log a warning.
    """


# ---------------------------------------------------------------------------------------------
# helpers


def sample_indices(n_tiles: int, max_tiles: int = DEFAULT_MAX_FIT_TILES) -> np.ndarray:
    """Deterministic, evenly spread indices of at most ``max_tiles`` out of ``n_tiles``.

    Useful for the caller to decide which tiles of a slide to keep for fitting.
    """
    if n_tiles <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_tiles <= 0:
        raise ValueError(f"max_tiles must be positive, got {max_tiles}")
    if n_tiles <= max_tiles:
        return np.arange(n_tiles, dtype=np.int64)
    # centre of each of max_tiles equal strata (never picks the same tile twice)
    return ((np.arange(max_tiles, dtype=np.int64) * 2 + 1) * n_tiles) // (2 * max_tiles)


def _check_rgb_uint8(arr: np.ndarray, what: str) -> None:
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must have shape (..., H, W, 3), got {arr.shape}")


def sample_pixels(
    tiles: TileInput, max_tiles: int, max_pixels: int = DEFAULT_MAX_FIT_PIXELS
) -> tuple[np.ndarray, int]:
    """(P, 3) uint8 pixels from a deterministic sample of the tiles, and the number of tiles."""
    if isinstance(tiles, np.ndarray):
        _check_rgb_uint8(tiles, "tiles")
        if tiles.ndim == 3:
            tiles = tiles[None]
        if tiles.ndim != 4:
            raise ValueError(f"tiles must have shape (N, H, W, 3) or (H, W, 3), got {tiles.shape}")
        chosen: list[np.ndarray] = [tiles[i] for i in sample_indices(len(tiles), max_tiles)]
    else:
        tile_list = list(tiles)
        chosen = [np.asarray(tile_list[i]) for i in sample_indices(len(tile_list), max_tiles)]
        for t in chosen:
            _check_rgb_uint8(t, "each tile")
            if t.ndim != 3:
                raise ValueError(f"each tile must have shape (H, W, 3), got {t.shape}")
    if not chosen:
        raise StainFitError("no tiles given to fit stain normalisation")
    pixels = np.concatenate([t.reshape(-1, 3) for t in chosen])
    if len(pixels) > max_pixels:
        step = -(-len(pixels) // max_pixels)  # ceil
        pixels = pixels[::step]
    return np.ascontiguousarray(pixels), len(chosen)


def not_black(pixels: np.ndarray) -> np.ndarray:
    """Mask of the (P, 3) pixels that are not black padding (any channel above ``_BLACK_MAX``)."""
    return pixels.max(axis=1) > _BLACK_MAX


def as_rgb_batch(tiles: np.ndarray) -> np.ndarray:
    """``tiles`` as a contiguous uint8 RGB array; TypeError / ValueError otherwise."""
    tiles = np.asarray(tiles)
    _check_rgb_uint8(tiles, "tiles")
    return np.ascontiguousarray(tiles)


def json_floats(x: Any) -> list[Any]:
    """Nested python floats (JSON-safe, exact repr) from an array-like."""
    return np.asarray(x, dtype=np.float64).tolist()


def check_method(params: Mapping[str, Any], name: str) -> None:
    """ValueError unless ``params`` were fitted by the normaliser ``name``."""
    method = params.get("method")
    if method != name:
        raise ValueError(f"params are for stain normaliser {method!r}, not {name!r}")


def rgb_to_lab8(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) uint8 OpenCV Lab (L8 = L* * 2.55, a8 = a* + 128, ...)."""
    flat = pixels.reshape(-1, 1, 3)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2LAB).reshape(pixels.shape)
