"""The weight-free demo encoder: deterministic, labelled not for research, and it separates the
synthetic planted biomarker (dense dark nuclear clusters) from pink stroma with purple dots.
Speed is measured by bench/bench_extraction.py, never asserted here.
"""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from stamp.encoders import get_spec, load_encoder


def _paint(rng: np.random.Generator, positive: bool, px: int = 224) -> np.ndarray:
    img = np.empty((px, px, 3), np.float32)
    img[:] = rng.uniform([225, 150, 180], [245, 185, 210])  # pink stroma
    img += rng.normal(0, 6, img.shape)
    for _ in range(int(rng.integers(15, 30))):  # eosin fibres
        p = rng.integers(0, px, 2)
        q = p + rng.integers(-60, 60, 2)
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), (215, 120, 165), 2)
    n_dots = int(rng.integers(8, 25))
    for _ in range(n_dots):  # scattered purple nuclei
        c = tuple(int(v) for v in rng.integers(0, px, 2))
        cv2.ellipse(
            img,
            c,
            (int(rng.integers(2, 5)), int(rng.integers(2, 4))),
            float(rng.uniform(0, 180)),
            0,
            360,
            tuple(float(v) for v in rng.uniform([110, 60, 140], [150, 90, 180])),
            -1,
        )
    if positive:  # dense clusters of dark nuclei
        for _ in range(int(rng.integers(2, 5))):
            centre = rng.integers(30, px - 30, 2)
            for _ in range(int(rng.integers(40, 90))):
                c = tuple(int(v) for v in centre + rng.normal(0, 18, 2))
                cv2.circle(
                    img,
                    c,
                    int(rng.integers(3, 6)),
                    tuple(float(v) for v in rng.uniform([50, 20, 90], [85, 45, 125])),
                    -1,
                )
    return np.clip(img, 0, 255).astype(np.uint8)


def _separability(feats: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.5))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, feats.astype(np.float32), labels, cv=cv).mean())


def test_demo_is_labelled_and_deterministic():
    spec = get_spec("demo")
    assert spec.research_use is False and "NOT FOR RESEARCH USE" in spec.notes and spec.weights is None
    enc = load_encoder("demo")
    assert enc.research_use is False and enc.dim == 96
    tiles = np.stack([_paint(np.random.default_rng(i), i % 2 == 0) for i in range(6)])
    a, b = enc.encode(tiles), enc.encode(tiles, batch_size=2)
    assert a.shape == (6, 96) and a.dtype == np.float16 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # independent of batching
    assert load_encoder("demo").weights_sha256 == enc.weights_sha256


def test_demo_separates_painted_planted_biomarker():
    rng = np.random.default_rng(7)
    labels = np.array([i % 2 for i in range(80)])
    tiles = np.stack([_paint(rng, bool(y)) for y in labels])
    acc = _separability(load_encoder("demo").encode(tiles), labels)
    assert acc >= 0.95, acc


@pytest.mark.skipif(importlib.util.find_spec("openslide") is None, reason="needs openslide")
def test_demo_separates_synthetic_slide_regions(tmp_path):
    """Tiles of a synthetic positive slide: planted vs tissue-only regions, at STAMP's 256 um / 224 px."""
    try:
        from stamp.synthetic import SlideSpec, write_slide
    except ImportError as e:  # the synthetic-slide module is being written in parallel
        pytest.skip(f"stamp.synthetic unavailable: {e}")
    import openslide

    side, tile_l0 = 5120, 512  # 0.5 um/px: 512 px = 256 um, resized to 224 like STAMP's default
    truth = write_slide(
        tmp_path / "pos.svs", SlideSpec(width=side, height=side, mpp=0.5, planted_fraction=0.4, seed=11)
    )
    slide = openslide.OpenSlide(str(tmp_path / "pos.svs"))
    tiles, labels = [], []
    for y in range(0, side - tile_l0 + 1, tile_l0 // 2):  # half-overlapping tiles: more samples
        for x in range(0, side - tile_l0 + 1, tile_l0 // 2):
            if truth.tissue_fraction_at(x, y, tile_l0, tile_l0) < 0.9:
                continue
            planted = truth.planted_fraction_at(x, y, tile_l0, tile_l0)
            if 0.0 < planted < 0.9:
                continue
            rgb = np.asarray(slide.read_region((x, y), 0, (tile_l0, tile_l0)).convert("RGB"))
            tiles.append(cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA))
            labels.append(int(planted >= 0.9))
    labels_arr = np.array(labels)
    if labels_arr.sum() < 5 or (1 - labels_arr).sum() < 5:
        pytest.skip(f"synthetic slide gave too few tiles per class: {np.bincount(labels_arr, minlength=2)}")
    acc = _separability(load_encoder("demo").encode(np.stack(tiles)), labels_arr)
    assert acc >= 0.95, acc
