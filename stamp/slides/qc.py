"""Per-slide QC outputs: STAMP's rejection thumbnail and tissue contours as QuPath-readable GeoJSON.

Both are written atomically (temp name in the target folder, then ``os.replace``), so a reader never
sees a half-written file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from stamp.fileio import atomic_write_bytes
from stamp.slides.reader_base import SlideReader
from stamp.slides.tiling import TilePlan

THUMBNAIL_MAX_SIZE = 512
REJECTED_RGBA = (255, 0, 0, 128)  # STAMP's overlay colour for grid cells without a kept tile
TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}


def kept_grid(plan: TilePlan, kept_coords_um: np.ndarray) -> np.ndarray:
    """Boolean (rows, cols) grid of cells holding a kept tile (``floor(coords / tile_size_um)``, as STAMP)."""
    grid = np.zeros(plan.grid, bool)
    coords = np.asarray(kept_coords_um, dtype=np.float64).reshape(-1, 2)
    if coords.size:
        idx = np.floor(coords / plan.tile_size_um + 1e-6).astype(np.int64)
        ok = (idx[:, 0] >= 0) & (idx[:, 1] >= 0) & (idx[:, 0] < plan.grid[1]) & (idx[:, 1] < plan.grid[0])
        grid[idx[ok, 1], idx[ok, 0]] = True
    return grid


def rejection_thumbnail(
    reader: SlideReader | None, plan: TilePlan, kept_coords_um: np.ndarray, max_size: int = THUMBNAIL_MAX_SIZE
) -> np.ndarray:
    """RGB thumbnail (longer side ``max_size``) with grid cells lacking a kept tile shaded red (α ½).

    Uses the plan's thumbnail when it is large enough, else reads one from ``reader``.
    """
    w0, h0 = plan.slide_dims
    scale = min(1.0, max_size / max(w0, h0))
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    src = plan.thumbnail
    if (src.shape[1] < tw or src.shape[0] < th) and reader is not None:
        thumb = reader.downsampled(tw, th)
    else:
        interp = cv2.INTER_AREA if src.shape[1] >= tw else cv2.INTER_LINEAR
        thumb = cv2.resize(src, (tw, th), interpolation=interp)
    grid = kept_grid(plan, kept_coords_um)
    # grid cell of each thumbnail pixel (centre), level-0 px → tile index
    cols = np.minimum(((np.arange(tw) + 0.5) * (w0 / tw) / plan.tile_px0).astype(np.int64), plan.grid[1] - 1)
    rows = np.minimum(((np.arange(th) + 0.5) * (h0 / th) / plan.tile_px0).astype(np.int64), plan.grid[0] - 1)
    rejected = ~grid[rows[:, None], cols[None, :]] if grid.size else np.ones((th, tw), bool)
    alpha = REJECTED_RGBA[3] / 255.0
    out = thumb.astype(np.float32)
    out[rejected] = out[rejected] * (1 - alpha) + np.array(REJECTED_RGBA[:3], np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_rejection_thumbnail(
    reader: SlideReader | None,
    plan: TilePlan,
    kept_coords_um: np.ndarray,
    path: Path | str,
    max_size: int = THUMBNAIL_MAX_SIZE,
    quality: int = 90,
) -> Path:
    """Write STAMP's ``<slide>.jpg`` rejection thumbnail (see :func:`rejection_thumbnail`)."""
    img = rejection_thumbnail(reader, plan, kept_coords_um, max_size)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError("JPEG encoding failed")
    return atomic_write_bytes(path, buf.tobytes())


def _ring(contour: np.ndarray, ds: tuple[float, float], clockwise: bool) -> list[list[float]] | None:
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return None
    # mask pixel centres → level-0 px
    xy = np.stack([(pts[:, 0] + 0.5) * ds[0], (pts[:, 1] + 0.5) * ds[1]], axis=1)
    x, y = xy[:, 0], xy[:, 1]
    area2 = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))  # shoelace, raw coordinates
    if area2 == 0:
        return None
    # RFC 7946 right-hand rule on the coordinate values: exterior rings positive (counter-clockwise),
    # holes negative (clockwise). QuPath accepts either; shapely/GIS tools expect this.
    if (area2 > 0) == clockwise:
        xy = xy[::-1]
    ring = [[round(float(a), 2), round(float(b), 2)] for a, b in xy]
    ring.append(ring[0])
    return ring


def tissue_polygons(mask: np.ndarray, downsample: float | Sequence[float]) -> list[list[list[list[float]]]]:
    """Polygons (exterior ring + hole rings) of a boolean mask, in level-0 px."""
    ds = (float(downsample), float(downsample)) if np.isscalar(downsample) else tuple(map(float, downsample))  # type: ignore[arg-type]
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if not m.any():
        return []
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    polygons = []
    for i, h in enumerate(hier):
        if h[3] != -1:  # a hole; handled with its parent
            continue
        outer = _ring(contours[i], ds, clockwise=False)  # type: ignore[arg-type]
        if outer is None:
            continue
        rings = [outer]
        child = h[2]
        while child != -1:
            hole = _ring(contours[child], ds, clockwise=True)  # type: ignore[arg-type]
            if hole is not None:
                rings.append(hole)
            child = hier[child][0]
        polygons.append(rings)
    return polygons


def tissue_feature_collection(mask: np.ndarray, downsample: float | Sequence[float]) -> dict:
    """GeoJSON FeatureCollection, one QuPath annotation (class ``Tissue``) per tissue piece."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": "annotation", "classification": dict(TISSUE_CLASS)},
        }
        for rings in tissue_polygons(mask, downsample)
    ]
    return {"type": "FeatureCollection", "features": features}


def write_tissue_geojson(mask: np.ndarray, downsample: float | Sequence[float], path: Path | str) -> Path:
    """Write tissue contours of ``mask`` (``downsample`` = level-0 px per mask px, scalar or (x, y))."""
    fc = tissue_feature_collection(mask, downsample)
    return atomic_write_bytes(path, json.dumps(fc, separators=(",", ":")).encode())
