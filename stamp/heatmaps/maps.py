"""Tile values → images on the slide's thumbnail grid: geometry, rasterising, colour maps, overlays.

Geometry: each tile covers ``px_per_tile`` (8, as STAMP) map pixels per side, so one map pixel is
``tile_size_um / px_per_tile`` µm and the thumbnail is ``slide size in µm × px_per_tile /
tile_size_um`` — correct for any tile size (STAMP divides by a hard-coded 256 µm, its #19). A
tile with top-left ``(x, y)`` µm starts at map pixel ``round((x, y) · px_per_tile / tile_size_um)``.
Very large slides get fewer pixels per tile so that the long side stays under :data:`MAX_SIDE`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "MAX_SIDE",
    "PX_PER_TILE",
    "MapGeometry",
    "blend",
    "class_colours",
    "colourise",
    "png_bytes",
]

PX_PER_TILE = 8
MAX_SIDE = 4096


@dataclass(frozen=True)
class MapGeometry:
    """Map/thumbnail size in pixels and where each tile lands on it."""

    width: int
    height: int
    px_per_tile: int
    um_per_px: float  # µm of slide per map pixel

    @classmethod
    def for_slide(
        cls,
        dimensions_px: tuple[int, int],
        mpp: float,
        tile_size_um: float,
        *,
        px_per_tile: int = PX_PER_TILE,
        max_side: int = MAX_SIDE,
    ) -> MapGeometry:
        """Geometry of a slide of level-0 size ``dimensions_px`` at ``mpp`` µm/px, ``tile_size_um`` tiles."""
        w_um, h_um = dimensions_px[0] * mpp, dimensions_px[1] * mpp
        tiles_long = max(w_um, h_um) / tile_size_um
        ppt = int(px_per_tile)
        if tiles_long * ppt > max_side:
            ppt = max(1, int(max_side // max(tiles_long, 1e-9)))
        um_per_px = tile_size_um / ppt
        width = max(1, math.ceil(w_um / um_per_px - 1e-6))
        height = max(1, math.ceil(h_um / um_per_px - 1e-6))
        return cls(width, height, ppt, um_per_px)

    def origins(self, coords_um: np.ndarray) -> np.ndarray:
        """Top-left map pixel (x, y) of each tile, ``(N, 2)`` int."""
        return np.rint(np.asarray(coords_um, dtype=np.float64) / self.um_per_px).astype(np.int64)

    def tile_index(self, coords_um: np.ndarray) -> np.ndarray:
        """``(height, width)`` int32 map: the tile covering each pixel, −1 where there is none."""
        p = self.px_per_tile
        idx = np.full((self.height + p, self.width + p), -1, dtype=np.int32)
        origins = self.origins(coords_um)
        if len(origins):
            ox = np.clip(origins[:, 0], 0, self.width)
            oy = np.clip(origins[:, 1], 0, self.height)
            offs = np.arange(p)
            rows = (oy[:, None] + offs)[:, :, None]
            cols = (ox[:, None] + offs)[:, None, :]
            idx[rows, cols] = np.arange(len(origins), dtype=np.int32)[:, None, None]
        return idx[: self.height, : self.width]


def paint(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Tile values ``(N,)`` → float map ``(H, W)``, NaN where no tile lies."""
    values = np.asarray(values, dtype=np.float32)
    out = np.full(index.shape, np.nan, dtype=np.float32)
    covered = index >= 0
    out[covered] = values[index[covered]]
    return out


def colourise(
    values: np.ndarray, cmap: str, vmin: float, vmax: float, *, centre: float | None = None
) -> np.ndarray:
    """Float map → RGBA uint8 with colour map ``cmap``; NaN becomes transparent.

    ``centre`` (optional) is mapped to the colour map's middle (a two-slope scale).
    """
    import matplotlib

    v = np.asarray(values, dtype=np.float32)
    if centre is None:
        span = vmax - vmin if vmax > vmin else 1.0
        t = (v - vmin) / span
    else:
        lo = centre - vmin if centre > vmin else 1.0
        hi = vmax - centre if vmax > centre else 1.0
        t = np.where(v < centre, 0.5 - 0.5 * (centre - v) / lo, 0.5 + 0.5 * (v - centre) / hi)
    t = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](t, bytes=True)
    rgba[..., 3] = np.where(np.isnan(v), 0, 255).astype(np.uint8)
    return rgba


def class_colours(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours of the ``Pastel1`` palette (STAMP's class-map colours)."""
    import matplotlib

    cmap = matplotlib.colormaps["Pastel1"]
    return np.array([cmap(i % cmap.N, bytes=True)[:3] for i in range(n)], dtype=np.uint8)


def class_map(index: np.ndarray, tile_class: np.ndarray, n_classes: int) -> np.ndarray:
    """RGBA uint8 map: each tile in the ``Pastel1`` colour of its single-tile class."""
    colours = class_colours(n_classes)
    rgba = np.zeros((*index.shape, 4), dtype=np.uint8)
    covered = index >= 0
    rgba[covered, :3] = colours[np.asarray(tile_class)[index[covered]]]
    rgba[covered, 3] = 255
    return rgba


def blend(thumbnail: np.ndarray, rgba: np.ndarray, opacity: float) -> np.ndarray:
    """The thumbnail (RGB) with ``rgba`` laid over it at ``opacity`` (× the map's own alpha)."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0 * float(opacity)
    out = thumbnail[..., :3].astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode an RGB or RGBA uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()
