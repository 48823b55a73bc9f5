"""``stamp demo`` on the synthetic cohort: its config, and how well the heatmaps find the planted regions.

:func:`demo_config` is the STAMP config that points every built stage at a cohort written by
:func:`stamp.synthetic.write_cohort`; :func:`planted_localisation` scores the heatmaps of that run
against the generator's truth. Not in :mod:`stamp.synthetic`: the generator's code version covers
that package, and the demo's settings are no part of the cohort.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stamp.config_models import PreprocessingConfig
from stamp.preprocessing import feature_dir
from stamp.synthetic.cohort import LABEL_COLUMN, POSITIVE, load_cohort_truth

N_SPLITS = 5
TOP_K = 5

# Small enough for 2 CPU cores; STAMP's defaults (dim 512, 32 epochs, batch 64) are sized for GPUs.
DEMO_ADVANCED = {
    "seed": 0,
    "max_epochs": 12,
    "patience": 6,
    "batch_size": 8,
    "num_workers": 0,
    "model_name": "vit",
    "model_params": {"vit": {"dim_model": 128, "dim_feedforward": 256, "n_heads": 4}},
}


def demo_config(out: Path, cohort: Mapping[str, Any]) -> dict[str, Any]:
    """The STAMP config (as a dict) that points every built stage at the synthetic cohort.

    ``cohort``: the paths of the written cohort (``slides_dir``, ``clini_table``, ``slide_table``).
    """
    pre = {
        "output_dir": str(out / "features"),
        "wsi_dir": cohort["slides_dir"],
        "extractor": "demo",
        "tile_size_um": 128.0,
        "tile_size_px": 224,
        "max_workers": 2,
    }
    feats = str(feature_dir(PreprocessingConfig.model_validate(pre)))
    tables = {
        "clini_table": cohort["clini_table"],
        "slide_table": cohort["slide_table"],
        "feature_dir": feats,
    }
    return {
        "preprocessing": pre,
        "crossval": {
            "output_dir": str(out / "crossval"),
            "ground_truth_label": LABEL_COLUMN,
            "n_splits": N_SPLITS,
            **tables,
        },
        "statistics": {
            "output_dir": str(out / "statistics"),
            "pred_csvs": [
                str(out / "crossval" / f"split-{i}" / "patient-preds.csv") for i in range(N_SPLITS)
            ],
            "ground_truth_label": LABEL_COLUMN,
            "true_class": POSITIVE,
        },
        "heatmaps": {
            "output_dir": str(out / "heatmaps"),
            "feature_dir": feats,
            "wsi_dir": cohort["slides_dir"],
            "checkpoint_path": str(out / "crossval" / "split-0" / "model.ckpt"),
            "topk": TOP_K,
            "bottomk": TOP_K,
        },
        "advanced_config": DEMO_ADVANCED,
        "orchestration": {"task_concurrency": 1},
    }


def planted_localisation(
    root: Path, heatmap_slides: Sequence[Mapping[str, Any]], crossval_dir: Path
) -> dict[str, Any]:
    """Share of the top-5 MSIH tiles of positive slides that lie inside the planted regions.

    ``root``: the synthetic cohort; ``heatmap_slides``: the heatmaps stage's per-slide results;
    ``crossval_dir``: the crossval run whose fold 0 made the heatmap model. ``centre``: the tile's
    centre lies in a planted region (all positive slides); ``area``: at least half of the tile is
    planted; ``held_out``: centre rule on the positive slides of fold 0's test patients only (the
    heatmap model is fold 0's, so it never saw them).
    """
    from stamp.heatmaps import localisation_score

    info = load_cohort_truth(root)
    truth = {r.truth.slide_path.resolve(): r for r in info.slides}
    held_out = set(json.loads((crossval_dir / "splits.json").read_text())["splits"][0]["test_patients"])
    pairs = []
    for value in heatmap_slides:
        record = truth.get(Path(value["slide_path"]).resolve())
        if record is not None and record.label == POSITIVE:
            pairs.append((SimpleNamespace(**value), record))

    def score(subset: list[Any], region: str) -> float:
        if not subset:
            return float("nan")
        results, truths = [r for r, _ in subset], [t.truth for _, t in subset]
        return localisation_score(results, truths, k=TOP_K, positive=POSITIVE, region=region)

    held = [p for p in pairs if p[1].patient in held_out]
    return {
        "centre": score(pairs, "centre"),
        "area": score(pairs, "tile"),
        "held_out": score(held, "centre"),
        "slides": len(pairs),
        "held_out_slides": len(held),
    }
