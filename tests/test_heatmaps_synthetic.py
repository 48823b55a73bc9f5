"""Acceptance (slow tier): heatmaps point at the planted biomarker of the synthetic cohort.

16 synthetic patients (positives = ``isMSIH == MSIH`` have planted regions), preprocessed with the
weight-free ``demo`` encoder at 128 µm tiles (not STAMP's 256 µm), a small ``vit`` and an
``abmil`` trained on them, then every positive slide rendered: of its top-5 tiles by relevance for
MSIH, at least 80 % must lie inside the planted regions (≥ half of the tile's area planted,
generator ground truth). Run: ``pytest -m slow tests/test_heatmaps_synthetic.py -s``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stamp.config_models import AdvancedConfig, HeatmapsConfig
from stamp.heatmaps import localisation_score, plan_heatmaps, render_slide, top_tile_fractions

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TILE_UM = 128.0
MODEL_PARAMS = {
    "vit": {"dim_model": 32, "dim_feedforward": 64, "n_heads": 2, "n_layers": 1},
    "abmil": {"dim_hidden": 32},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from stamp.encoders import load_encoder
    from stamp.preprocessing import PreprocessParams, extract_slide
    from stamp.slides import TilingParams
    from stamp.synthetic import write_cohort

    root = tmp_path_factory.mktemp("hm-cohort")
    info = write_cohort(root, n_patients=16, seed=0, size=6144, mpps=(0.5,), variants=False)
    encoder = load_encoder("demo")
    params = PreprocessParams(extractor="demo", tiling=TilingParams(tile_size_um=TILE_UM, tile_size_px=224))
    for rec in info.slides:
        extract_slide(rec.truth.slide_path, root / "features" / rec.filename, params, encoder)
    return info


def _train(info: Any, model: str, out: Path) -> Path:
    from stamp.cohort import load_cohort
    from stamp.modeling.train import inner_split, train_model

    root = info.root
    data = load_cohort(task="classification", clini_table=root / "clini.csv", slide_table=root / "slide.csv",
                       feature_dir=root / "features", ground_truth_label="isMSIH")  # fmt: skip
    advanced = AdvancedConfig(bag_size=256, batch_size=4, max_epochs=40, patience=100, num_workers=0, max_lr=1e-3,
                              seed=0, accelerator="cpu", model_name=model, model_params=MODEL_PARAMS)  # fmt: skip
    train, valid = inner_split(data.patients, data, 0)
    return train_model(train, valid, data, advanced=advanced, output_dir=out, seed=0)


@pytest.mark.parametrize("model", ["vit", "abmil"])
def test_top_tiles_lie_in_the_planted_regions(cohort: Any, tmp_path: Path, model: str) -> None:
    ckpt = _train(cohort, model, tmp_path / "model")
    labels = {r.truth.slide_path.stem: r.label for r in cohort.slides}
    truths = {r.truth.slide_path.stem: r.truth for r in cohort.slides}
    sec = HeatmapsConfig(output_dir=tmp_path / "heatmaps", feature_dir=cohort.root / "features",
                         wsi_dir=cohort.slides_dir, checkpoint_path=ckpt, topk=5, bottomk=5)  # fmt: skip
    plan = plan_heatmaps(sec)
    assert len(plan) == len(cohort.slides) and not plan.skipped
    negatives = [j for j in plan if labels[j.stem] != "MSIH"][:2]
    results, seconds = [], []
    for job in [j for j in plan if labels[j.stem] == "MSIH"] + negatives:
        start = time.perf_counter()
        results.append(render_slide(job, ckpt, opacity=sec.opacity, topk=5, bottomk=5, device="cpu"))
        seconds.append(time.perf_counter() - start)
    positives = [r for r in results if labels[Path(r.slide_path).stem] == "MSIH"]
    per_slide = {
        r.slide: localisation_score(r, truths[Path(r.slide_path).stem], k=5, positive="MSIH")
        for r in positives
    }
    pooled = localisation_score(positives, truths, k=5, positive="MSIH")
    tiles = sum(r.n_tiles for r in results)
    print(f"\n{model}: top-5 localisation pooled {pooled:.3f}, per slide min {min(per_slide.values()):.2f} "
          f"over {len(positives)} positive slides; {np.mean(seconds):.2f} s per slide "
          f"(max {max(seconds):.2f}, {tiles / len(results):.0f} tiles per slide)")  # fmt: skip
    assert pooled >= 0.8
    assert all(v >= 0.8 for v in per_slide.values()), per_slide
    assert all(r.predicted == "MSIH" for r in positives)
    for r in results:  # every slide has its files and five top tiles of 128 µm / 0.5 µm/px = 256 px
        assert r.overview.is_file() and r.geojson.is_file() and r.thumbnail.is_file()
        top = r.top[r.predicted]
        assert sum(1 for t in top if t.file) == 5 and all(t.size_px == 256 for t in top)
    frac = top_tile_fractions(positives[0], truths[Path(positives[0].slide_path).stem], 5, positive="MSIH")
    assert frac.shape == (5,)
