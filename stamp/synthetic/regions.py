"""Tissue and planted-region geometry of a synthetic slide, and its ground-truth files.

Geometry lives on a coarse grid of *mask cells*, one cell per ``downsample`` x
``downsample`` level-0 pixels (cell ``(i, j)`` covers x in ``[j*D, (j+1)*D)``,
y in ``[i*D, (i+1)*D)``). Each region is a continuous *score* per cell, scaled
to be roughly a signed distance in cells (> 0 inside). Painting upsamples the
score bilinearly (half-pixel-centre convention, as ``cv2.resize``) and
thresholds it, so painted edges are smooth curves, not cell staircases.

* painted coverage of a cell = fraction of its 4 x 4 sub-samples of the
  upsampled score that are > 0; binary masks (the ``.png`` files,
  ``tissue_mask``) = coverage >= 0.5, so they agree with the pixels;
* GeoJSON polygons trace the same upsampled score at ``D / 4`` px resolution,
  i.e. the painted boundary to within ~``D / 8`` px.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import cv2
import numpy as np

_EPS = 1e-4


@dataclass(frozen=True)
class SlideFields:
    """Region scores of one slide on the mask-cell grid (float32, shape ``(ceil(H/D), ceil(W/D))``)."""

    downsample: int
    tissue_score: np.ndarray
    planted_score: np.ndarray

    @cached_property
    def tissue_mask(self) -> np.ndarray:
        """Boolean tissue mask: cells at least half covered by painted tissue."""
        return coverage(self.tissue_score) >= 0.5

    @cached_property
    def planted_mask(self) -> np.ndarray:
        """Boolean planted-biomarker mask, same rule (a subset of ``tissue_mask``)."""
        return (coverage(self.planted_score) >= 0.5) & self.tissue_mask

    @property
    def tissue_fraction(self) -> float:
        """Tissue cells / all cells (mask rule)."""
        return float(self.tissue_mask.mean())

    @property
    def planted_fraction(self) -> float:
        """Planted cells / tissue cells (0 when there is no tissue)."""
        n = int(self.tissue_mask.sum())
        return float(self.planted_mask.sum()) / n if n else 0.0


UPSAMPLE = 4  # sub-samples per cell side for coverage and polygons
TISSUE_EDGE_PX = 3.0  # width of the painted soft edge of tissue (level-0 px)
PLANTED_EDGE_PX = 16.0  # width of the soft edge of planted regions (infiltration-like)


def upsample_score(score: np.ndarray, up: int = UPSAMPLE) -> np.ndarray:
    """Bilinear upsampling by ``up`` with the painter's half-pixel-centre convention."""
    mh, mw = score.shape
    return cv2.resize(score, (mw * up, mh * up), interpolation=cv2.INTER_LINEAR)


def coverage(score: np.ndarray, up: int = UPSAMPLE) -> np.ndarray:
    """Fraction of each cell where the upsampled score is > 0 (float32, the cell grid's shape)."""
    mh, mw = score.shape
    inside = (upsample_score(score, up) > 0).reshape(mh, up, mw, up)
    return inside.mean(axis=(1, 3), dtype=np.float32)


def drop_specks(score: np.ndarray, downsample: int, edge_px: float, min_cells: int = 2) -> np.ndarray:
    """Remove regions the mask cannot see: components of the painted area with < ``min_cells`` mask cells.

    Painting gives alpha > 0 where ``score > -edge_px / (2 * downsample)``; a
    component of that area holding fewer than ``min_cells`` cells of the mask
    rule would be painted but missing from the truth, so it is set to -1.
    """
    fringe = edge_px / (2.0 * downsample) + 0.02
    n, labels = cv2.connectedComponents((score > -fringe).astype(np.uint8), connectivity=8)
    if n <= 1:
        return score
    cells = np.bincount(labels[coverage(score) >= 0.5], minlength=n)
    small = cells < min_cells
    small[0] = False
    if not small.any():
        return score
    out = score.copy()
    out[small[labels]] = -1.0
    return out


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, unit std (float32)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    out = cv2.GaussianBlur(white, (0, 0), max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    out -= out.mean()
    return out / max(float(out.std()), 1e-12)


def _as_distance(field: np.ndarray, level: float) -> np.ndarray:
    """``field - level`` divided by the median gradient near the level set: ~signed distance in cells."""
    s = (field - level).astype(np.float32)
    gy, gx = np.gradient(s)
    grad = np.hypot(gx, gy)
    band = np.abs(s) < np.quantile(np.abs(s), 0.1)
    g = float(np.median(grad[band])) if band.any() else 1.0
    return s / max(g, 1e-6)


def _top_k_level(values: np.ndarray, k: int) -> float:
    """A level such that exactly the ``k`` largest of ``values`` are strictly above it (k >= 1)."""
    srt = np.sort(values)
    return float(srt[-k]) - _EPS if k < len(srt) else float(srt[0]) - _EPS


def make_fields(
    rng: np.random.Generator,
    width: int,
    height: int,
    downsample: int,
    planted_fraction: float,
    tissue_range: tuple[float, float] = (0.30, 0.46),
    blank: bool = False,
) -> SlideFields:
    """Draw a tissue layout (a few irregular blobs with holes) and planted regions inside it.

    ``planted_fraction`` is the fraction of the *tissue* area to plant (0 for
    negatives); the planted regions come from the top of a smooth random field
    restricted to tissue 1-3 cells (by slide size; 32-96 px at D=32) from any
    edge or hole, so they form a few irregular patches fully inside tissue. The
    level is tuned so the painted planted fraction matches the request to ~1 %,
    or all eligible area is planted when that is smaller (see
    :attr:`SlideFields.planted_fraction`). Regions too small for the mask are
    removed, so everything painted is in the masks.
    """
    mh, mw = -(-height // downsample), -(-width // downsample)
    shape = (mh, mw)
    if blank:
        neg = np.full(shape, -10.0, np.float32)
        return SlideFields(downsample, neg, neg.copy())
    m = min(mh, mw)
    ii, jj = np.mgrid[0:mh, 0:mw]
    edge_dist = np.minimum(np.minimum(ii, mh - 1 - ii), np.minimum(jj, mw - 1 - jj)).astype(np.float32)
    edge_pen = 8.0 * np.clip(1.0 - edge_dist / max(0.08 * m, 1.0), 0.0, 1.0) ** 2
    for _ in range(20):  # redraw until the tissue fraction is in range (almost always the first try)
        blob = _smooth(rng, shape, 0.11 * m) + 0.35 * _smooth(rng, shape, 0.035 * m)
        blob = blob / blob.std() - edge_pen
        target = rng.uniform(*tissue_range)
        s_blob = _as_distance(blob, float(np.quantile(blob, 1.0 - target)))
        holes = _smooth(rng, shape, 0.022 * m)
        s_hole = _as_distance(-holes, -float(np.quantile(holes, 0.95)))
        tissue = drop_specks(np.minimum(s_blob, s_hole).astype(np.float32), downsample, TISSUE_EDGE_PX)
        frac = float((tissue > 0).mean())
        if 0.2 <= frac <= 0.45:
            break
    planted = np.full(shape, -10.0, np.float32)
    if planted_fraction > 0:
        # planted regions keep 1-3 cells (32-96 px at D=32) from tissue edges and holes
        margin = float(np.clip(0.02 * m, 1.0, 3.0))
        planted = _plant(rng, tissue, planted_fraction, 0.12 * m, margin, downsample)
    return SlideFields(downsample, tissue, planted)


def _plant(
    rng: np.random.Generator,
    tissue: np.ndarray,
    fraction: float,
    sigma: float,
    margin: float,
    downsample: int,
) -> np.ndarray:
    """Planted score: top of a smooth field inside tissue shrunk by the margin, sized by bisection.

    The level is tuned so the *painted* planted area (mask rule) / tissue area
    matches ``fraction`` to ~1 % (or all eligible area when that is smaller).
    """
    # the tissue score is ~ a signed distance in cells and smooth, unlike a distance transform
    s_elig = tissue - margin
    elig = s_elig > 0
    if not elig.any():
        return np.full(tissue.shape, -10.0, np.float32)
    field = _smooth(rng, tissue.shape, sigma)
    n_tissue = float((coverage(tissue) >= 0.5).sum())
    k = max(1, min(round(fraction * n_tissue), int(elig.sum())))
    level0 = _top_k_level(field[elig], k)
    scale = float(_as_distance(field, level0)[elig].std() / max(float(field[elig].std()), 1e-12))

    def score(level: float) -> np.ndarray:
        raw = np.minimum((field - level) * scale, s_elig).astype(np.float32)
        return drop_specks(raw, downsample, PLANTED_EDGE_PX)

    def painted(level: float) -> float:
        return float((coverage(score(level)) >= 0.5).sum()) / n_tissue

    lo, hi = float(field[elig].min()) - _EPS, float(field[elig].max())
    best = level0
    for _ in range(14):  # painted(level) falls as level rises
        mid = 0.5 * (lo + hi)
        got = painted(mid)
        best = mid
        if abs(got - fraction) <= 0.01 * fraction:
            break
        lo, hi = (mid, hi) if got > fraction else (lo, mid)
    return score(best)


def score_polygons(
    score: np.ndarray, downsample: int, width: int, height: int, up: int = UPSAMPLE
) -> list[list[np.ndarray]]:
    """Polygons (level-0 px) of ``score > 0``: a list of ``[exterior, *holes]`` rings, each ``(N, 2)`` float.

    Exteriors have positive signed area in (x, y) (counter-clockwise in a y-up
    frame, as RFC 7946 asks), holes negative. Rings are closed.
    """
    # findContours traces the centres of the outermost inside sub-pixels, half a sub-pixel inside
    # the true boundary; thresholding at -0.5/up (score ~ distance in cells) moves them onto it.
    binary = (upsample_score(score, up) > -0.5 / up).astype(np.uint8)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    scale = downsample / up

    def ring(c: np.ndarray, exterior: bool) -> np.ndarray | None:
        c = cv2.approxPolyDP(c, 0.75, True).reshape(-1, 2).astype(np.float64)
        if len(c) < 3:
            return None
        pts = (c + 0.5) * scale
        pts[:, 0] = np.clip(pts[:, 0], 0, width)
        pts[:, 1] = np.clip(pts[:, 1], 0, height)
        x, y = pts[:, 0], pts[:, 1]
        area2 = float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        if (area2 > 0) != exterior:
            pts = pts[::-1]
        return np.vstack([pts, pts[:1]])

    polys: list[list[np.ndarray]] = []
    for idx, h in enumerate(hierarchy[0]):
        if h[3] != -1:
            continue  # a hole; collected with its parent
        ext = ring(contours[idx], True)
        if ext is None:
            continue
        rings = [ext]
        child = h[2]
        while child != -1:
            hole = ring(contours[child], False)
            if hole is not None:
                rings.append(hole)
            child = hierarchy[0][child][0]
        polys.append(rings)
    return polys


def feature_collection(
    polygons: list[list[np.ndarray]], name: str, color: tuple[int, int, int], meta: dict[str, Any]
) -> dict[str, Any]:
    """A QuPath-importable GeoJSON FeatureCollection of annotation polygons (level-0 px, y down).

    ``meta`` is stored as the foreign member ``stamp_synthetic``.
    """
    features = [
        {
            "type": "Feature",
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[round(float(x), 2), round(float(y), 2)] for x, y in r] for r in rings],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": list(color)},
            },
        }
        for rings in polygons
    ]
    return {"type": "FeatureCollection", "features": features, "stamp_synthetic": meta}


def rect_fraction(mask: np.ndarray, downsample: int, x: float, y: float, w: float, h: float) -> float:
    """Area-weighted fraction of the level-0 rectangle ``(x, y, w, h)`` covered by a cell ``mask``.

    Parts of the rectangle outside the mask grid count as not covered.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"rectangle needs positive size, got w={w}, h={h}")
    mh, mw = mask.shape

    def coverage(start: float, length: float, n: int) -> tuple[int, np.ndarray]:
        a, b = start / downsample, (start + length) / downsample
        lo, hi = max(int(np.floor(a)), 0), min(int(np.ceil(b)), n)
        if hi <= lo:
            return 0, np.zeros(0)
        edges = np.arange(lo, hi + 1, dtype=np.float64)
        cov = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
        return lo, cov

    y0, cy = coverage(y, h, mh)
    x0, cx = coverage(x, w, mw)
    if not len(cy) or not len(cx):
        return 0.0
    sub = mask[y0 : y0 + len(cy), x0 : x0 + len(cx)].astype(np.float64)
    return float(cy @ sub @ cx) / ((w / downsample) * (h / downsample))
