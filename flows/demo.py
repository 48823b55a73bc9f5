"""``stamp demo``: the whole pipeline on the built-in synthetic cohort, through the cohort flow.

Writes the synthetic cohort and ``<out>/config.yaml`` (a STAMP config for it that every command
accepts), runs the ``cohort`` flow on that config (preprocess → crossval → statistics →
heatmaps) and ends with a report: the crossval AUROC with its 95 % CI, the heatmaps'
localisation score (share of top tiles inside the generator's planted regions, on the slides of
patients the heatmap model never saw), time per stage, and where the outputs are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from stamp.config import dump_config, load_config
from stamp.config_models import PreprocessingConfig
from stamp.fileio import atomic_path
from stamp.logs import logger
from stamp.preprocessing import feature_dir
from stamp.synthetic import load_cohort_truth
from stamp_flows.cohort import cohort_flow, stage_subflow_settings
from stamp_flows.synth import synth_flow

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


def demo_config(out: Path, cohort: dict[str, Any]) -> dict[str, Any]:
    """The STAMP config (as a dict) that points every built stage at the synthetic cohort."""
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
            "ground_truth_label": "isMSIH",
            "n_splits": N_SPLITS,
            **tables,
        },
        "statistics": {
            "output_dir": str(out / "statistics"),
            "pred_csvs": [
                str(out / "crossval" / f"split-{i}" / "patient-preds.csv") for i in range(N_SPLITS)
            ],
            "ground_truth_label": "isMSIH",
            "true_class": "MSIH",
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


@task(name="write-demo-config")
def write_demo_config(out: str, cohort: dict[str, Any]) -> str:
    """Write ``<out>/config.yaml`` (validated through the same loader the commands use)."""
    path = Path(out) / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(demo_config(Path(out), cohort), sort_keys=False))
        cfg = load_config(tmp)  # fails loudly if the demo config drifted from the schema
        tmp.write_text("# Written by `stamp demo` for its synthetic cohort.\n" + dump_config(cfg))
    return str(path)


def auroc_ci(stats: dict[str, Any], level: str = "aggregate") -> tuple[float, float, float]:
    """Mean AUROC of class MSIH over the folds and its 95 % t-interval, from the statistics rows
    (``level="baseline"``: the mean-pool baseline's on the same folds)."""
    for row in stats["rows"]:
        if row.get("level") == level and row.get("class") == "MSIH":
            return row["roc_auc_score"], row["roc_auc_score_lo"], row["roc_auc_score_hi"]
    raise ValueError(f"statistics produced no {level} AUROC row for class MSIH")


def auroc_line(stats: dict[str, Any], model: str) -> str:
    """``vit 0.930 (95% CI 0.880–0.980) vs mean-pool baseline 0.950 (95% CI …)``."""
    auroc, lo, hi = auroc_ci(stats)
    line = f"{model} {auroc:.3f} (95% CI {lo:.3f}–{hi:.3f})"
    try:
        base, blo, bhi = auroc_ci(stats, "baseline")
    except ValueError:
        return line
    return line + f" vs mean-pool baseline {base:.3f} (95% CI {blo:.3f}–{bhi:.3f})"


def localisation(root: Path, heatmaps: dict[str, Any], crossval_dir: Path) -> dict[str, Any]:
    """Share of the top-5 MSIH tiles of positive slides that lie inside the planted regions.

    ``centre``: the tile's centre lies in a planted region (all positive slides); ``area``: at
    least half of the tile is planted; ``held_out``: centre rule on the positive slides of fold
    0's test patients only (the heatmap model is fold 0's, so it never saw them).
    """
    from stamp.heatmaps import localisation_score

    info = load_cohort_truth(root)
    truth = {r.truth.slide_path.resolve(): r for r in info.slides}
    held_out = set(json.loads((crossval_dir / "splits.json").read_text())["splits"][0]["test_patients"])
    pairs = []
    for value in heatmaps["slides"]:
        record = truth.get(Path(value["slide_path"]).resolve())
        if record is not None and record.label == "MSIH":
            pairs.append((SimpleNamespace(**value), record))

    def score(subset: list[Any], region: str) -> float:
        if not subset:
            return float("nan")
        results, truths = [r for r, _ in subset], [t.truth for _, t in subset]
        return localisation_score(results, truths, k=TOP_K, positive="MSIH", region=region)

    held = [p for p in pairs if p[1].patient in held_out]
    return {
        "centre": score(pairs, "centre"),
        "area": score(pairs, "tile"),
        "held_out": score(held, "centre"),
        "slides": len(pairs),
        "held_out_slides": len(held),
    }


@flow(name="demo")
def demo_flow(out: str = "stamp-demo", patients: int = 32, seed: int = 0) -> str:
    """Write the synthetic cohort, run the cohort flow on it and return the report text."""
    root = Path(out).resolve()
    t0 = time.perf_counter()
    with stage_subflow_settings():
        cohort = synth_flow(out=str(root / "cohort"), patients=patients, seed=seed)
    timings = {"synthetic cohort": time.perf_counter() - t0}
    config_path = write_demo_config(str(root), cohort)
    cfg = load_config(config_path)
    with stage_subflow_settings():
        run = cohort_flow(config_path=config_path)
    timings.update(run["seconds"])
    stages = run["stages"]
    pre, cv, stats, heat = (stages[k] for k in ("preprocess", "crossval", "statistics", "heatmaps"))
    kept = sum(int(r["tiles_kept"] or 0) for r in pre["rows"])
    statuses = ", ".join(f"{n} {s}" for s, n in pre["counts"].items() if n)
    model = (cfg.advanced_config.model_name if cfg.advanced_config else None) or "vit"
    assert cfg.crossval is not None and cfg.heatmaps is not None
    loc = localisation(Path(cohort["root"]), heat, Path(cfg.crossval.output_dir))
    roc = Path(stats["output_dir"]) / "roc-curve_isMSIH=MSIH.png"
    lines = [
        "STAMP demo on the synthetic cohort",
        f"  cohort:     {cohort['root']}  ({len(cohort['slides'])} slides; tables clini.csv, slide.csv)",
        f"  config:     {config_path}  (use it with: stamp -c {config_path} <command>, or stamp run)",
        f"  features:   {pre['feature_dir']}  ({statuses}; {kept} tiles; encoder 'demo', not for research use)",
        f"  crossval:   {cv['output_dir']}  (splits.json, split-*/model.ckpt, split-*/patient-preds.csv)",
        f"  statistics: {stats['output_dir']}  (isMSIH_categorical-stats_*.csv, ROC: {roc.name})",
        f"  heatmaps:   {heat['output_dir']}  ({len(heat['slides'])} slides: plots/, raw/, tiles/, *.geojson)",
        f"  AUROC isMSIH=MSIH over {N_SPLITS} folds: {auroc_line(stats, model)}",
        f"  heatmap localisation: {loc['centre']:.0%} of the top-{TOP_K} MSIH tiles of {loc['slides']} positive"
        f" slides lie in planted regions (tile centre; {loc['area']:.0%} with >= half the tile planted;"
        f" {loc['held_out']:.0%} on the {loc['held_out_slides']} slides fold 0's model never saw)",
        "  time per stage:",
        *(f"    {name:24s} {secs:6.1f} s" for name, secs in timings.items()),
        f"    {'total':24s} {time.perf_counter() - t0:6.1f} s",
        "  open the plots: " + str(roc) + "; heatmaps: <heatmaps>/<slide>/plots/overview-<slide>.png",
    ]
    report = "\n".join(lines)
    create_markdown_artifact(key="demo-report", markdown="```\n" + report + "\n```", description="stamp demo")
    logger.info("demo finished in %.1f s", time.perf_counter() - t0)
    return report
