"""``stamp demo``: the whole pipeline on the built-in synthetic cohort, through the cohort flow.

Writes the synthetic cohort and ``<out>/config.yaml`` (a STAMP config for it that every command
accepts), runs the ``cohort`` flow on that config (preprocess → crossval → statistics →
heatmaps) and ends with a report: the crossval AUROC with its 95 % CI, the heatmaps'
localisation score (share of top tiles inside the generator's planted regions, on the slides of
patients the heatmap model never saw), time per stage, and where the outputs are.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from stamp.config import load_config
from stamp.demo import N_SPLITS, TOP_K, planted_localisation
from stamp.logs import logger
from stamp.statistics.classification import auroc_ci
from stamp_flows.cohort import cohort_flow, stage_subflow_settings
from stamp_flows.synth import synth_flow
from stamp_tasks.demo import write_demo_config


def auroc_line(stats: dict[str, Any], model: str) -> str:
    """``vit 0.930 (95% CI 0.880–0.980) vs mean-pool baseline 0.950 (95% CI …)``."""
    auroc, lo, hi = auroc_ci(stats["rows"], "MSIH")
    line = f"{model} {auroc:.3f} (95% CI {lo:.3f}–{hi:.3f})"
    try:
        base, blo, bhi = auroc_ci(stats["rows"], "MSIH", "baseline")
    except ValueError:
        return line
    return line + f" vs mean-pool baseline {base:.3f} (95% CI {blo:.3f}–{bhi:.3f})"


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
    loc = planted_localisation(Path(cohort["root"]), heat["slides"], Path(cfg.crossval.output_dir))
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
