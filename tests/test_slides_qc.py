"""QC outputs: rejection thumbnail (STAMP's ``<slide>.jpg``) and tissue GeoJSON for QuPath."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stamp.slides import TilingParams, open_slide
from stamp.slides.qc import (
    kept_grid,
    rejection_thumbnail,
    tissue_polygons,
    write_rejection_thumbnail,
    write_tissue_geojson,
)
from stamp.slides.tile_reading import tile_slide
from stamp.synthetic import SlideSpec, SlideTruth, write_slide
from tests.conftest import leftover_temps


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("qc")
    truth = write_slide(
        d / "s.svs", SlideSpec(width=4096, height=3000, mpp=0.5, planted_fraction=0.2, seed=4)
    )
    with open_slide(truth.slide_path) as r:
        tiles, coords, plan, stats = tile_slide(
            r, 0.5, TilingParams(tile_size_um=128.0, tile_size_px=112, max_workers=2)
        )
    return truth, coords, plan


def _signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring[:-1])
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def test_rejection_thumbnail_written_and_shaded(tiled, tmp_path: Path) -> None:
    truth, coords, plan = tiled
    out = write_rejection_thumbnail(None, plan, coords, tmp_path / "sub" / "s.jpg")
    img = cv2.imread(str(out))
    assert img is not None and max(img.shape[:2]) <= 512
    assert img.shape[:2] == (375, 512)  # aspect of 4096 x 3000
    assert not leftover_temps(out.parent)  # atomic: no temp left behind
    rgb = rejection_thumbnail(None, plan, coords).astype(int)
    rows, cols = np.mgrid[0 : plan.grid[0], 0 : plan.grid[1]]
    base = rejection_thumbnail(None, plan, plan.coords_um(rows.ravel(), cols.ravel())).astype(
        int
    )  # nothing shaded
    grid = kept_grid(plan, coords)
    scale = 512 / 4096
    for (r, c), kept in np.ndenumerate(grid):
        y, x = int((r + 0.5) * plan.tile_px0 * scale), int((c + 0.5) * plan.tile_px0 * scale)
        if y >= rgb.shape[0] or x >= rgb.shape[1]:
            continue
        if kept:
            assert (rgb[y, x] == base[y, x]).all()
        else:  # blended half-way towards pure red
            np.testing.assert_allclose(
                rgb[y, x], base[y, x] * 0.498 + np.array([255, 0, 0]) * 0.502, atol=1.5
            )


def test_kept_grid_accepts_stamp_style_coords(tiled) -> None:
    _, coords, plan = tiled
    drifted = coords * 1.0005  # STAMP's ceil side drifts upward a little
    np.testing.assert_array_equal(kept_grid(plan, drifted), kept_grid(plan, coords))


def test_tissue_geojson_parses_and_matches_truth(tiled, tmp_path: Path) -> None:
    truth, _, plan = tiled
    path = write_tissue_geojson(plan.tissue_mask, plan.thumb_downsample, tmp_path / "s.tissue.geojson")
    fc = json.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    area = 0.0
    for feat in fc["features"]:
        assert feat["properties"]["objectType"] == "annotation"
        assert feat["properties"]["classification"]["name"] == "Tissue"
        geom = feat["geometry"]
        assert geom["type"] == "Polygon"
        for i, ring in enumerate(geom["coordinates"]):
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed
            a = _signed_area(ring)
            assert (a > 0) if i == 0 else (a < 0)  # exterior CCW, holes CW (RFC 7946)
            area += a
            xy = np.asarray(ring)
            assert (xy >= 0).all() and (xy[:, 0] <= 4096 + 64).all() and (xy[:, 1] <= 3000 + 64).all()
    # polygon area ≈ truth tissue area (level-0 px²)
    truth_area = truth.tissue_fraction * truth.width * truth.height
    assert area == pytest.approx(truth_area, rel=0.15)


def test_polygons_with_holes() -> None:
    mask = np.zeros((50, 60), bool)
    mask[5:45, 5:55] = True
    mask[20:30, 20:30] = False  # a hole
    mask[47:49, 57:59] = True  # a small separate piece
    polys = tissue_polygons(mask, 4.0)
    assert len(polys) == 2
    big = max(polys, key=lambda p: abs(_signed_area(p[0])))
    assert len(big) == 2  # exterior + one hole
    assert _signed_area(big[0]) > 0 > _signed_area(big[1])
    assert abs(_signed_area(big[0])) == pytest.approx(40 * 50 * 16, rel=0.1)
    assert tissue_polygons(np.zeros((5, 5), bool), 1.0) == []


def test_geojson_of_synthetic_truth_mask(tiled, tmp_path: Path) -> None:
    """Our contour writer on the truth mask reproduces the truth area closely (writer check)."""
    truth: SlideTruth = tiled[0]
    tissue, _ = truth.masks()
    path = write_tissue_geojson(tissue, truth.mask_downsample, tmp_path / "t.geojson")
    fc = json.loads(path.read_text())
    area = sum(sum(_signed_area(r) for r in f["geometry"]["coordinates"]) for f in fc["features"])
    assert area == pytest.approx(tissue.sum() * truth.mask_downsample**2, rel=0.1)


def test_plan_thumbnail_bigger_than_512_path(tmp_path: Path) -> None:
    """With a reader given and a small plan thumbnail, the QC thumbnail is read from the slide."""
    truth = write_slide(tmp_path / "t.svs", SlideSpec(width=2048, height=2048, mpp=0.25, seed=9))
    with open_slide(truth.slide_path) as r:
        _, coords, plan, _ = tile_slide(r, 0.25, TilingParams(max_workers=2))
        assert max(plan.thumbnail.shape[:2]) < 512
        img = rejection_thumbnail(r, plan, coords)
    assert img.shape[:2] == (512, 512)
