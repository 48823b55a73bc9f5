"""Plan the tiling of a slide: the tile grid, the read level, the tissue decision and supertile groups.

Reading the planned tiles (supertile reads in a bounded thread pool, Canny stage 2) lives in
:mod:`stamp.slides.tile_reading`, which imports the plan types from here (never the other way round).

Geometry (documented contract):

* **Grid.** Non-overlapping square tiles from (0, 0) of side ``tile_size_um``; in level-0 px the side
  is ``tile_px0 = tile_size_um / mpp`` (a float). Tile (row r, col c) has its top-left at
  ``(c, r) * tile_px0`` level-0 px and its coordinates are exactly ``(c, r) * tile_size_um`` µm, so
  µm coordinates are exact multiples of the tile size (float32-exact for integer multiples). The
  grid holds every tile whose origin lies inside the slide; edge tiles extend past the border and are
  padded with white by the reader.
* **STAMP comparison.** STAMP uses an integer side ``ceil(tile_size_um / mpp)`` level-0 px and µm
  coordinates ``supertile_px * mpp + i * tile_size_um``. When ``tile_size_um / mpp`` is an integer
  (e.g. 0.25 or 0.5 µm/px at 256 µm) both grids are identical in px and µm. Otherwise STAMP's grid
  drifts by < 1 level-0 px per tile against the physical one; ours does not. STAMP also lists
  tiles that start beyond the slide (inside partial supertiles, all black); we do not.
* **Read level.** The coarsest pyramid level whose mpp is ≤ the target ``tile_size_um /
  tile_size_px`` (within 1 %, :data:`LEVEL_MPP_TOLERANCE`) is read; ``TilingParams.read_level``
  forces one (0 = STAMP, which always reads level 0). Read windows are rounded to whole pixels of
  that level (≤ 0.5 px, i.e. ≤ 0.5 output px, misregistration) and resized with ``cv2.INTER_AREA``
  for reductions ≥ 1.5×, ``INTER_LINEAR`` for milder ones and for upsampling
  (:func:`~stamp.slides.tile_reading.resize_interpolation`).
* **mpp_effective.** The finest detail the delivered tiles actually carry, in µm/px: the realised
  spacing of the tile pixels (read window × level mpp / output px, = ``mpp_requested`` up to
  whole-pixel rounding of the window), or the read level's own mpp when that is coarser (a slide
  scanned coarser than the target is upsampled, and says so here).
* **Rejection, ``tissue_method="stamp"`` (default).** Stage 1 per STAMP supertile (``n × n`` tiles,
  ``n = max(int(1024 * mpp // tile_size_um), 1)`` — STAMP's 1024-level-0-px rule, kept even though
  we read other levels): STAMP's thumbnail procedure (one gray pixel per cell, see
  :func:`stamp.slides.tissue.stamp_brightness_cells`) < ``brightness_cutoff``. Stage 2 per tile:
  grayscale of the *resized* tile (as STAMP), ``cv2.Canny(gray, 40, 100)``, keep if the edge-pixel
  fraction ≥ ``canny_cutoff``.
* **``tissue_method="otsu"``.** Stage 1 is the Otsu tissue mask of the thumbnail: keep tiles whose
  tissue fraction ≥ ``min_tissue_fraction`` (``brightness_cutoff`` is not used); stage 2 Canny as
  above when ``canny_cutoff`` is set.

Reads are grouped into supertiles of ``supertile_tiles × supertile_tiles`` tiles (auto: as many as
fit in ~1024 px of the read level); see :mod:`stamp.slides.tile_reading` for how they are read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stamp.slides.reader_base import SlideReader
from stamp.slides.tissue import otsu_tissue_mask, stamp_brightness_cells, tile_tissue_fraction

_logger = logging.getLogger("stamp")

LEVEL_MPP_TOLERANCE = 0.01
"""A level whose mpp exceeds the target by at most this fraction still counts as ≤ target."""
STAMP_MAX_SUPERTILE_PX0 = 1024
"""STAMP's ``max_supertile_size_slide_px``: defines the brightness-test cells."""
SUPERTILE_LEVEL_PX = 1024
"""Auto read-supertile side, in pixels of the read level."""
THUMB_TARGET_MPP = 8.0
"""Resolution of the planning thumbnail (µm/px), within the bounds below."""
THUMB_MAX_SIZE = 4096
THUMB_MIN_PX_PER_TILE = 4

TissueMethod = Literal["stamp", "otsu"]


@dataclass(frozen=True)
class TilingParams:
    """Tiling and rejection parameters (STAMP's ``preprocessing`` keys plus our optional ones)."""

    tile_size_um: float = 256.0
    tile_size_px: int = 224
    brightness_cutoff: int | None = 240
    canny_cutoff: float | None = 0.02
    tissue_method: TissueMethod = "stamp"
    min_tissue_fraction: float = 0.1
    max_workers: int = 8
    supertile_tiles: int | None = None
    read_level: int | None = None

    def __post_init__(self) -> None:
        if not self.tile_size_um > 0:
            raise ValueError(f"tile_size_um must be > 0, got {self.tile_size_um}")
        if int(self.tile_size_px) != self.tile_size_px or self.tile_size_px <= 0:
            raise ValueError(f"tile_size_px must be a positive integer, got {self.tile_size_px}")
        if self.brightness_cutoff is not None and not 0 < self.brightness_cutoff < 255:
            raise ValueError(f"brightness_cutoff must be in (0, 255) or None, got {self.brightness_cutoff}")
        if self.canny_cutoff is not None and not 0 < self.canny_cutoff < 1:
            raise ValueError(f"canny_cutoff must be in (0, 1) or None, got {self.canny_cutoff}")
        if self.tissue_method not in ("stamp", "otsu"):
            raise ValueError(f"tissue_method must be 'stamp' or 'otsu', got {self.tissue_method!r}")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.supertile_tiles is not None and self.supertile_tiles < 1:
            raise ValueError(f"supertile_tiles must be >= 1 or None, got {self.supertile_tiles}")
        if self.read_level is not None and self.read_level < 0:
            raise ValueError(f"read_level must be >= 0 or None, got {self.read_level}")

    @property
    def mpp_requested(self) -> float:
        """Target µm per tile pixel: ``tile_size_um / tile_size_px``."""
        return self.tile_size_um / self.tile_size_px


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Everything decided before any tile is read. Arrays are indexed [row, col] of the tile grid."""

    slide_dims: tuple[int, int]
    slide_mpp: float
    tile_size_um: float
    tile_size_px: int
    tile_px0: float
    grid: tuple[int, int]
    level: int
    level_downsample: float
    level_mpp: float
    mpp_requested: float
    mpp_effective: float
    tissue_method: str
    cell_tiles: int
    supertile_tiles: int
    candidates: np.ndarray
    tissue_fraction: np.ndarray | None
    groups: tuple[tuple[int, int, int, int], ...]
    thumbnail: np.ndarray
    thumb_downsample: tuple[float, float]
    tissue_mask: np.ndarray
    reader: str = ""

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_candidates(self) -> int:
        return int(self.candidates.sum())

    @property
    def upsampled(self) -> bool:
        """True when the slide is coarser than the target resolution (tiles are upsampled)."""
        return self.level_mpp > self.mpp_requested * (1 + LEVEL_MPP_TOLERANCE)

    def coords_um(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Top-left (x, y) µm coordinates of tiles, float32 (n, 2)."""
        return np.stack(
            [np.asarray(cols) * self.tile_size_um, np.asarray(rows) * self.tile_size_um], axis=1
        ).astype(np.float32)

    def candidate_coords_um(self) -> np.ndarray:
        rows, cols = np.nonzero(self.candidates)
        return self.coords_um(rows, cols)

    def describe(self) -> dict[str, object]:
        """Scalar facts worth recording next to the features (h5 attrs, run summaries)."""
        return {
            "slide_reader": self.reader,
            "slide_mpp": self.slide_mpp,
            "mpp_requested": self.mpp_requested,
            "mpp_effective": self.mpp_effective,
            "read_level": self.level,
            "read_level_mpp": self.level_mpp,
            "read_level_downsample": self.level_downsample,
            "tile_size_um": self.tile_size_um,
            "tile_size_px": self.tile_size_px,
            "tissue_method": self.tissue_method,
            "grid_rows": self.grid[0],
            "grid_cols": self.grid[1],
        }


# --------------------------------------------------------------------------- planning


def stamp_cell_tiles(mpp: float, tile_size_um: float) -> int:
    """Tiles per side of a STAMP supertile (its brightness-test cell)."""
    return max(int((STAMP_MAX_SUPERTILE_PX0 * mpp) // tile_size_um), 1)


def choose_level(reader: SlideReader, mpp: float, target_mpp: float) -> int:
    """The coarsest level whose mpp is ≤ ``target_mpp`` (within :data:`LEVEL_MPP_TOLERANCE`); else 0."""
    best = 0
    for level, ds in enumerate(reader.level_downsamples):
        if mpp * ds <= target_mpp * (1 + LEVEL_MPP_TOLERANCE) and ds >= reader.level_downsamples[best]:
            best = level
    return best


def _grid_count(extent_px0: int, tile_px0: float) -> int:
    return max(0, math.ceil(extent_px0 / tile_px0 - 1e-9))


def _thumbnail_size(dims: tuple[int, int], mpp: float, tile_px0: float) -> tuple[int, int]:
    w, h = dims
    ds = max(1.0, THUMB_TARGET_MPP / mpp)
    ds = min(ds, tile_px0 / THUMB_MIN_PX_PER_TILE)  # enough pixels per tile
    ds = max(ds, max(w, h) / THUMB_MAX_SIZE, 1.0)  # bounded size
    return max(1, round(w / ds)), max(1, round(h / ds))


def _groups(candidates: np.ndarray, g: int) -> tuple[tuple[int, int, int, int], ...]:
    rows, cols = candidates.shape
    out = []
    for r0 in range(0, rows, g):
        for c0 in range(0, cols, g):
            sub = candidates[r0 : r0 + g, c0 : c0 + g]
            if not sub.any():
                continue
            rr = np.flatnonzero(sub.any(axis=1))
            cc = np.flatnonzero(sub.any(axis=0))
            out.append((r0 + int(rr[0]), r0 + int(rr[-1]) + 1, c0 + int(cc[0]), c0 + int(cc[-1]) + 1))
    return tuple(out)


def plan_tiles(reader: SlideReader, mpp: float, params: TilingParams) -> TilePlan:
    """Grid, read level, thumbnail-based tissue decision and supertile grouping for one slide."""
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    dims = reader.dimensions
    tile_um, tile_px = float(params.tile_size_um), int(params.tile_size_px)
    tile_px0 = tile_um / mpp
    grid = (_grid_count(dims[1], tile_px0), _grid_count(dims[0], tile_px0))
    target = params.mpp_requested

    if params.read_level is None:
        level = choose_level(reader, mpp, target)
    else:
        if params.read_level >= reader.level_count:
            raise ValueError(f"read_level {params.read_level} but the slide has {reader.level_count} levels")
        level = params.read_level
    ds_level = reader.level_downsamples[level]
    level_mpp = mpp * ds_level
    tile_level = tile_px0 / ds_level  # tile side in pixels of the read level
    g = params.supertile_tiles or max(1, int(SUPERTILE_LEVEL_PX // tile_level))
    realised = round(g * tile_level) * level_mpp / (g * tile_px)
    mpp_effective = max(realised, level_mpp)
    if level_mpp > target * (1 + LEVEL_MPP_TOLERANCE):
        _logger.warning(
            "%s: slide resolution %.4g µm/px is coarser than the requested %.4g µm/px; tiles are upsampled",
            reader.path,
            level_mpp,
            target,
        )

    tw, th = _thumbnail_size(dims, mpp, tile_px0)
    thumbnail = reader.downsampled(tw, th)
    thumb_ds = (dims[0] / tw, dims[1] / th)
    tissue_mask = otsu_tissue_mask(thumbnail, thumb_mpp=mpp * (thumb_ds[0] + thumb_ds[1]) / 2)

    n_cell = stamp_cell_tiles(mpp, tile_um)
    tissue_fraction = None
    if params.tissue_method == "stamp":
        cell_grid = (math.ceil(grid[0] / n_cell), math.ceil(grid[1] / n_cell))
        cells = stamp_brightness_cells(reader, cell_grid, params.brightness_cutoff)
        candidates = np.repeat(np.repeat(cells, n_cell, axis=0), n_cell, axis=1)[: grid[0], : grid[1]]
    else:
        tissue_fraction = tile_tissue_fraction(tissue_mask, thumb_ds, dims, tile_px0, grid)
        candidates = (tissue_fraction >= params.min_tissue_fraction) & (tissue_fraction > 0)
    candidates = np.ascontiguousarray(candidates, dtype=bool)

    return TilePlan(
        slide_dims=dims,
        slide_mpp=float(mpp),
        tile_size_um=tile_um,
        tile_size_px=tile_px,
        tile_px0=tile_px0,
        grid=grid,
        level=level,
        level_downsample=float(ds_level),
        level_mpp=float(level_mpp),
        mpp_requested=target,
        mpp_effective=float(mpp_effective),
        tissue_method=params.tissue_method,
        cell_tiles=n_cell,
        supertile_tiles=g,
        candidates=candidates,
        tissue_fraction=tissue_fraction,
        groups=_groups(candidates, g),
        thumbnail=thumbnail,
        thumb_downsample=thumb_ds,
        tissue_mask=tissue_mask,
        reader=reader.name,
    )
