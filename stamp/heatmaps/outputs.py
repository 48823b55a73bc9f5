"""Per-tile outputs: top/bottom tile images, the QuPath GeoJSON and the raw arrays.

* Top/bottom tiles are read from the slide at level 0, at each tile's own position and size
  (``tile_size_um / mpp`` level-0 px, not resized) and saved as JPEG (STAMP, §2.10).
* The GeoJSON has one feature per tile: a level-0 pixel polygon with
  ``properties = {"objectType": "tile", "classification": {...}, "measurements": {...}}``, which
  QuPath (File › Import objects) opens as tiles it can colour as a measurement map.
* ``raw/<slide>-arrays.npz`` keeps every per-tile array (coords, relevance, outputs, attention).
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stamp.slides.reader_base import SlideReader

__all__ = ["TopTile", "geojson_text", "rank", "safe_name", "save_arrays", "top_tiles", "write_tiles"]

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def safe_name(text: str) -> str:
    """``text`` usable in a file name (path separators and reserved characters → ``_``)."""
    return _UNSAFE.sub("_", str(text)).strip() or "_"


@dataclass(frozen=True)
class TopTile:
    """A top or bottom tile: position (µm, level-0 px), size, score, its JPEG ("" if none written)."""

    rank: int
    x_um: float
    y_um: float
    x_px: int
    y_px: int
    size_px: int
    score: float
    relevance: float
    file: str


def rank(values: np.ndarray, k: int, *, largest: bool = True) -> np.ndarray:
    """Indices of the ``k`` largest (or smallest) values, best first; ties by tile order."""
    values = np.asarray(values, dtype=np.float64)
    k = max(0, min(int(k), len(values)))
    order = np.argsort(-values if largest else values, kind="stable")
    return order[:k]


def top_tiles(
    coords_um: np.ndarray,
    indices: np.ndarray,
    *,
    mpp: float,
    tile_size_um: float,
    scores: np.ndarray,
    relevance: np.ndarray,
) -> list[TopTile]:
    """The tiles ``indices`` (best first) with their level-0 boxes; no file yet."""
    size = max(1, round(tile_size_um / mpp))
    out = []
    for n, i in enumerate(indices, start=1):
        x_um, y_um = (float(v) for v in coords_um[i])
        out.append(
            TopTile(
                n,
                x_um,
                y_um,
                round(x_um / mpp),
                round(y_um / mpp),
                size,
                float(scores[i]),
                float(relevance[i]),
                "",
            )
        )
    return out


def write_tiles(
    reader: SlideReader, folder: Path, tiles: list[TopTile], *, prefix: str, suffix: str
) -> list[TopTile]:
    """Read each tile at level 0 (its own position and size) and save ``<prefix>_NN-<suffix>=<score>.jpg``."""
    out = []
    for t in tiles:
        pixels = reader.read_region(t.x_px, t.y_px, 0, t.size_px, t.size_px)
        name = f"{prefix}_{t.rank:02d}-{suffix}={t.score:.2f}.jpg"
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(buf.getvalue())
        out.append(replace(t, file=name))
    return out


def _num(value: float) -> float | None:
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def geojson_text(
    coords_um: np.ndarray,
    *,
    mpp: float,
    tile_size_um: float,
    measurements: dict[str, np.ndarray],
    tile_class: list[str] | None = None,
    class_rgb: dict[str, tuple[int, int, int]] | None = None,
) -> str:
    """A GeoJSON FeatureCollection: one tile polygon (level-0 px) per tile with its measurements."""
    side = tile_size_um / mpp
    names = list(measurements)
    columns = [np.asarray(measurements[k], dtype=np.float64) for k in names]
    features: list[dict[str, Any]] = []
    for i, (x_um, y_um) in enumerate(np.asarray(coords_um, dtype=np.float64)):
        x0, y0 = round(x_um / mpp, 3), round(y_um / mpp, 3)
        x1, y1 = round(x0 + side, 3), round(y0 + side, 3)
        props: dict[str, Any] = {
            "objectType": "tile",
            "name": f"tile {i}",
            "measurements": {k: _num(col[i]) for k, col in zip(names, columns, strict=True)},
        }
        if tile_class is not None:
            cls = tile_class[i]
            props["classification"] = {
                "name": cls,
                "color": list((class_rgb or {}).get(cls, (128, 128, 128))),
            }
        features.append(
            {
                "type": "Feature",
                "id": f"tile-{i}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": props,
            }
        )
    return json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))


def save_arrays(path: Path, **arrays: Any) -> None:
    """Write the per-tile arrays (and label lists) to a compressed ``.npz`` (``np.load`` reads it).

    Written entry by entry with a fixed zip timestamp (``np.savez`` stamps the wall clock), so the
    same arrays give the same bytes and a rerun's outputs can be compared by digest.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            if value is None:
                continue
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
