"""Tissue detection: STAMP's brightness test, an Otsu tissue mask, per-tile tissue fractions.

All of it works on thumbnails, so it costs milliseconds whatever the slide size. For the mask,
regions (tiles) are given by their edges in level-0 px and mapped to mask px by rounding, so every
mask pixel belongs to exactly one tile and fractions are exact area averages (integral image).
"""

from __future__ import annotations

import cv2
import numpy as np

from stamp.slides.reader_base import SlideReader

_WHOLE_LEVEL_PX = 16 * 2**20

# Otsu on saturation is clamped to this range (of 0..255): a blank slide has only JPEG noise in
# saturation, where Otsu would split noise; very saturated tissue would push it above pale tissue.
OTSU_SATURATION_RANGE = (20, 60)


def _integral(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(values, axis=0, dtype=np.float64), axis=1, out=out[1:, 1:])
    return out


def grid_edges(n: int, step_px0: float, limit_px0: int, downsample: float, size: int) -> np.ndarray:
    """Thumbnail-pixel edges of ``n`` consecutive cells of ``step_px0`` level-0 px, clipped to the slide."""
    edges_px0 = np.minimum(np.arange(n + 1, dtype=np.float64) * step_px0, limit_px0)
    return np.clip(np.round(edges_px0 / downsample), 0, size).astype(np.int64)


def box_sums(values: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and pixel count of ``values`` over the cells spanned by consecutive edges.

    Returns two arrays of shape (len(y_edges) - 1, len(x_edges) - 1).
    """
    ii = _integral(values)
    y0, y1 = y_edges[:-1, None], y_edges[1:, None]
    x0, x1 = x_edges[None, :-1], x_edges[None, 1:]
    sums = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    counts = (y1 - y0) * (x1 - x0)
    return sums, counts.astype(np.float64)


def stamp_brightness_cells(
    reader: SlideReader, cell_grid: tuple[int, int], cutoff: float | None
) -> np.ndarray:
    """STAMP's stage-1 test: one thumbnail pixel per cell, keep the cell if its gray value < ``cutoff``.

    Re-states STAMP's procedure so a STAMP config selects the same cells: OpenSlide's
    ``get_thumbnail`` of twice the cell grid (best level read whole, LANCZOS ``thumbnail`` keeping
    the aspect ratio), resized (PIL bicubic) onto the ``ceil``-sized cell grid — which stretches the
    slide slightly over the grid's overhang, as in STAMP — then PIL grayscale. Levels above
    16 Mpx are first area-reduced blockwise (memory bound; STAMP reads them whole).
    ``cell_grid`` = (rows, cols). ``cutoff=None`` keeps every cell.
    """
    from PIL import Image

    rows, cols = cell_grid
    if cutoff is None:
        return np.ones((rows, cols), bool)
    size = (2 * cols, 2 * rows)
    w0, h0 = reader.dimensions
    level = reader.level_for_downsample(max(w0 / size[0], h0 / size[1]))
    lw, lh = reader.level_dimensions[level]
    if lw * lh <= _WHOLE_LEVEL_PX:
        img = reader.whole_level(level)
    else:
        factor = max(1.0, min(lw / (4 * size[0]), lh / (4 * size[1])))
        img = reader.downsampled(max(1, round(lw / factor)), max(1, round(lh / factor)))
    thumb = Image.fromarray(img)
    thumb.thumbnail(size, Image.Resampling.LANCZOS)
    gray = np.asarray(thumb.resize((cols, rows)).convert("L"))
    return gray < cutoff


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 == 1 else n + 1


def otsu_tissue_mask(
    thumbnail: np.ndarray,
    *,
    thumb_mpp: float | None = None,
    min_object_um2: float = 10_000.0,
    max_hole_um2: float = 10_000.0,
    saturation_range: tuple[int, int] = OTSU_SATURATION_RANGE,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    HSV saturation → median blur → Otsu threshold (clamped to ``saturation_range``) → morphological
    opening (removes specks) and closing (bridges gaps) → connected components smaller than
    ``min_object_um2`` removed → holes smaller than ``max_hole_um2`` filled. Sizes are in µm² when
    ``thumb_mpp`` (µm per thumbnail px) is known, else the defaults are taken as px at 8 µm/px.
    """
    if thumbnail.size == 0:
        return np.zeros(thumbnail.shape[:2], bool)
    mpp = float(thumb_mpp) if thumb_mpp else 8.0
    sat = cv2.cvtColor(np.ascontiguousarray(thumbnail), cv2.COLOR_RGB2HSV)[..., 1]
    blur = _odd(min(7.0, max(3.0, 24.0 / mpp)))
    if min(sat.shape) >= blur:
        sat = cv2.medianBlur(sat, blur)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thresh = float(np.clip(otsu, *saturation_range))
    mask: np.ndarray = (sat > thresh).astype(np.uint8)

    k_open = _odd(max(3.0, 16.0 / mpp))
    k_close = _odd(max(3.0, 32.0 / mpp))
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_open, k_open))
    )
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_close, k_close))
    )

    px_area = mpp * mpp
    mask = remove_small_objects(mask.astype(bool), min_object_um2 / px_area)
    mask = fill_small_holes(mask, max_hole_um2 / px_area)
    return mask


def remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected foreground components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill 4-connected background components not touching the border with ≤ ``max_px`` pixels."""
    if max_px <= 0:
        return mask
    inv = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches_border) & (stats[:, cv2.CC_STAT_AREA] <= max_px)
    fill[0] = False
    return mask | fill[labels]


def tile_tissue_fraction(
    mask: np.ndarray,
    downsample: tuple[float, float],
    slide_dims: tuple[int, int],
    tile_px0: float,
    grid: tuple[int, int],
) -> np.ndarray:
    """Fraction of each tile's full area covered by ``mask`` (area outside the slide counts as none)."""
    rows, cols = grid
    th, tw = mask.shape
    xe = grid_edges(cols, tile_px0, slide_dims[0], downsample[0], tw)
    ye = grid_edges(rows, tile_px0, slide_dims[1], downsample[1], th)
    sums, _ = box_sums(mask.astype(np.float32), xe, ye)
    full_area = (tile_px0 / downsample[0]) * (tile_px0 / downsample[1])
    return (sums / max(full_area, 1e-9)).clip(0.0, 1.0).astype(np.float32)
