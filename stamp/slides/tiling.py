"""Tile a slide: plan the grid and the read level, then read supertiles in a bounded thread pool.

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
  (:func:`resize_interpolation`).
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
fit in ~1024 px of the read level) and only the bounding box of a group's candidate tiles is read.
At most ``max_workers`` supertile reads are in flight; batches are yielded in plan order by default
(``ordered=False``: as they complete). The kept set never depends on ``max_workers``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Literal

import cv2
import numpy as np

from stamp.slides.readers import SlideReader
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
CANNY_THRESHOLDS = (40, 100)
AREA_MIN_FACTOR = 1.5

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


@dataclass(frozen=True, eq=False)
class TileBatch:
    """Kept tiles of one supertile: ``tiles`` uint8 (n, px, px, 3) RGB, ``coords_um`` float32 (n, 2)."""

    tiles: np.ndarray
    coords_um: np.ndarray

    def __len__(self) -> int:
        return int(self.tiles.shape[0])


@dataclass
class TilingStats:
    """Counts for one slide; ``complete`` once :func:`iter_tile_batches` is exhausted.

    ``rejected_background``: tiles dropped by stage 1 (brightness cells or tissue mask);
    ``pixels_read``: pixels of the read level requested from the reader; ``seconds``: wall time of
    the iteration (includes the consumer's time between batches).
    """

    tiles_total: int = 0
    rejected_background: int = 0
    rejected_canny: int = 0
    kept: int = 0
    seconds: float = 0.0
    supertiles_read: int = 0
    pixels_read: int = 0
    level: int = 0
    tissue_method: str = "stamp"
    complete: bool = False

    def summary(self) -> str:
        stage1 = "brightness" if self.tissue_method == "stamp" else "tissue mask"
        return (
            f"{self.kept} of {self.tiles_total} tiles kept ({self.rejected_background} rejected by {stage1}, "
            f"{self.rejected_canny} by Canny) in {self.seconds:.2f} s"
        )

    def no_tissue_reason(self) -> str:
        """One-line reason for a slide that yielded no tile."""
        return f"no tissue found: {self.summary()}"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


# --------------------------------------------------------------------------- reading


def resize_interpolation(factor: float) -> int:
    """``INTER_AREA`` (antialiased) for reductions ≥ :data:`AREA_MIN_FACTOR`, else ``INTER_LINEAR``.

    Below 1.5× reduction bilinear aliasing is negligible, and OpenCV's non-integer ``INTER_AREA`` path
    costs ~5× more (measured: 1024→896 px, 4.5 ms vs 0.8 ms). Upsampling is always bilinear.
    """
    return cv2.INTER_AREA if factor >= AREA_MIN_FACTOR else cv2.INTER_LINEAR


def _edge_fraction_gray(gray: np.ndarray) -> float:
    edges = cv2.Canny(gray, *CANNY_THRESHOLDS)
    return cv2.countNonZero(edges) / edges.size


def edge_fraction(tile: np.ndarray) -> float:
    """STAMP's texture score: fraction of Canny(40, 100) edge pixels of the tile's grayscale."""
    return _edge_fraction_gray(cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2GRAY))


@dataclass
class _GroupResult:
    tiles: np.ndarray
    coords_um: np.ndarray
    rejected_canny: int
    pixels_read: int


def read_supertile(
    reader: SlideReader, plan: TilePlan, group: tuple[int, int, int, int], canny_cutoff: float | None
) -> _GroupResult:
    """Read one group's window at the plan's level, resize, cut into tiles, apply Canny."""
    r0, r1, c0, c1 = group
    px = plan.tile_size_px
    ds = plan.level_downsample
    step = plan.tile_px0 / ds  # tile side at the read level
    lx0, lx1 = round(c0 * step), round(c1 * step)
    ly0, ly1 = round(r0 * step), round(r1 * step)
    w, h = max(1, lx1 - lx0), max(1, ly1 - ly0)
    window = reader.read_region(round(lx0 * ds), round(ly0 * ds), plan.level, w, h)
    out_w, out_h = (c1 - c0) * px, (r1 - r0) * px
    if (w, h) != (out_w, out_h):
        window = cv2.resize(window, (out_w, out_h), interpolation=resize_interpolation(w / out_w))
    sub = plan.candidates[r0:r1, c0:c1]
    rows, cols = np.nonzero(sub)
    keep = np.ones(rows.size, bool)
    tiles = np.empty((rows.size, px, px, 3), np.uint8)
    gray = cv2.cvtColor(window, cv2.COLOR_RGB2GRAY) if canny_cutoff is not None else None
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        ys, xs = slice(r * px, (r + 1) * px), slice(c * px, (c + 1) * px)
        if gray is not None and canny_cutoff is not None and _edge_fraction_gray(gray[ys, xs]) < canny_cutoff:
            keep[i] = False
            continue
        tiles[i] = window[ys, xs]
    return _GroupResult(
        tiles=tiles[keep],
        coords_um=plan.coords_um(rows[keep] + r0, cols[keep] + c0),
        rejected_canny=int((~keep).sum()),
        pixels_read=w * h,
    )


class TileBatchIterator(Iterator[TileBatch]):
    """Iterator of :class:`TileBatch` with :attr:`stats`; closing it stops the reader threads."""

    def __init__(
        self, reader: SlideReader, plan: TilePlan, params: TilingParams, *, ordered: bool = True
    ) -> None:
        self.reader = reader
        self.ordered = ordered
        self.plan = plan
        self.params = params
        self.stats = TilingStats(
            tiles_total=plan.n_tiles,
            rejected_background=plan.n_tiles - plan.n_candidates,
            level=plan.level,
            tissue_method=plan.tissue_method,
        )
        self._gen: Generator[TileBatch, None, None] = self._run()

    def __next__(self) -> TileBatch:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> TileBatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> Generator[TileBatch, None, None]:
        start = time.perf_counter()
        groups = iter(self.plan.groups)
        canny = self.params.canny_cutoff
        inflight: deque[Future[_GroupResult]] = deque()  # submission (= plan) order
        executor = ThreadPoolExecutor(max_workers=self.params.max_workers, thread_name_prefix="stamp-tiles")

        def submit_next() -> None:
            group = next(groups, None)
            if group is not None:
                inflight.append(executor.submit(read_supertile, self.reader, self.plan, group, canny))

        def take() -> Future[_GroupResult]:
            if self.ordered:
                return inflight.popleft()
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            fut = next(iter(done))
            inflight.remove(fut)
            return fut

        try:
            for _ in range(self.params.max_workers):
                submit_next()
            while inflight:
                result = take().result()
                submit_next()  # keep the pool busy while the consumer works on this batch
                self.stats.supertiles_read += 1
                self.stats.pixels_read += result.pixels_read
                self.stats.rejected_canny += result.rejected_canny
                self.stats.kept += len(result.tiles)
                self.stats.seconds = time.perf_counter() - start
                if len(result.tiles):
                    yield TileBatch(tiles=result.tiles, coords_um=result.coords_um)
            self.stats.complete = True
        finally:
            for fut in inflight:
                fut.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
            self.stats.seconds = time.perf_counter() - start


def iter_tile_batches(
    reader: SlideReader, plan: TilePlan, params: TilingParams, *, ordered: bool = True
) -> TileBatchIterator:
    """Kept tiles of ``plan`` in batches, one per supertile.

    ``ordered=True`` (default) yields supertiles in plan order, so what follows (batching,
    encoding) does not depend on thread timing; ``False`` yields in completion order.
    Either way at most ``params.max_workers`` supertile reads are in flight.
    """
    return TileBatchIterator(reader, plan, params, ordered=ordered)


def tile_slide(
    reader: SlideReader, mpp: float, params: TilingParams
) -> tuple[np.ndarray, np.ndarray, TilePlan, TilingStats]:
    """Convenience: all kept tiles and coords sorted by (y, x), the plan and the stats."""
    plan = plan_tiles(reader, mpp, params)
    it = iter_tile_batches(reader, plan, params)
    tiles, coords = [], []
    for batch in it:
        tiles.append(batch.tiles)
        coords.append(batch.coords_um)
    px = params.tile_size_px
    all_tiles = np.concatenate(tiles) if tiles else np.empty((0, px, px, 3), np.uint8)
    all_coords = np.concatenate(coords) if coords else np.empty((0, 2), np.float32)
    order = np.lexsort((all_coords[:, 0], all_coords[:, 1]))
    return all_tiles[order], all_coords[order], plan, it.stats
