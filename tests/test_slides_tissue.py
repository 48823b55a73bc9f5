"""Tissue detection pieces: Otsu mask, morphology filters, per-tile tissue fractions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stamp.slides import TilingParams, open_slide, plan_tiles
from stamp.slides.tissue import (
    fill_small_holes,
    otsu_tissue_mask,
    remove_small_objects,
    tile_tissue_fraction,
)
from stamp.synthetic import SlideSpec, write_slide


def test_otsu_mask_matches_synthetic_truth(tmp_path: Path) -> None:
    truth = write_slide(tmp_path / "s.svs", SlideSpec(width=4096, height=3072, mpp=0.5, seed=11))
    with open_slide(truth.slide_path) as r:
        plan = plan_tiles(r, 0.5, TilingParams(tissue_method="otsu"))
    gt, _ = truth.masks()
    mask = cv2.resize(plan.tissue_mask.astype(np.uint8), gt.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    iou = (mask & gt).sum() / (mask | gt).sum()
    assert iou >= 0.85, iou
    assert plan.tissue_fraction is not None and plan.tissue_fraction.shape == plan.grid


def test_otsu_blank_and_empty() -> None:
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(243, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert not otsu_tissue_mask(glass, thumb_mpp=8.0).any()
    assert otsu_tissue_mask(np.zeros((0, 0, 3), np.uint8)).shape == (0, 0)


def test_otsu_finds_pink_blob_and_drops_specks() -> None:
    img = np.full((300, 300, 3), 245, np.uint8)
    cv2.circle(img, (150, 150), 80, (215, 130, 185), -1)
    img[10:12, 10:12] = (215, 130, 185)  # a 2x2 px speck = 256 µm² at 8 µm/px < 10,000 µm²
    mask = otsu_tissue_mask(img, thumb_mpp=8.0)
    disk = np.zeros((300, 300), np.uint8)
    cv2.circle(disk, (150, 150), 80, 1, -1)
    assert (mask & (disk > 0)).sum() / (mask | (disk > 0)).sum() > 0.95
    assert not mask[:20, :20].any()


def test_small_objects_and_holes() -> None:
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[15:18, 15:18] = False  # 9 px hole
    m[0:2, 38:40] = True  # 4 px object
    assert not remove_small_objects(m, 5)[0:2, 38:40].any()
    assert remove_small_objects(m, 5)[5:35, 5:35].sum() == 30 * 30 - 9
    filled = fill_small_holes(m, 10)
    assert filled[15:18, 15:18].all()
    assert not fill_small_holes(m, 8)[15:18, 15:18].any()
    assert not filled[20:, 36:].any()  # background touching the border stays


def test_tile_tissue_fraction_exact() -> None:
    # mask at downsample 4: level-0 slide 400x200, tiles of 100 px → grid (2, 4)
    mask = np.zeros((50, 100), bool)
    mask[0:25, 0:25] = True  # exactly tile (0, 0)
    mask[25:50, 50:63] = True  # about half of tile (1, 2)
    fr = tile_tissue_fraction(mask, (4.0, 4.0), (400, 200), 100.0, (2, 4))
    assert fr[0, 0] == pytest.approx(1.0)
    assert fr[1, 2] == pytest.approx(13 / 25, abs=0.01)
    assert fr.sum() == pytest.approx(1.0 + 13 / 25, abs=0.01)
    # a partial edge tile counts outside-slide area as no tissue
    fr_edge = tile_tissue_fraction(np.ones((50, 100), bool), (4.0, 4.0), (400, 200), 150.0, (2, 3))
    assert fr_edge[0, 0] == pytest.approx(1.0)
    assert fr_edge[0, 2] == pytest.approx(100 / 150, abs=0.02)
    assert fr_edge[1, 0] == pytest.approx(50 / 150, abs=0.02)
