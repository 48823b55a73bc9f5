"""Prefect tasks for ``statistics`` and ``heatmaps`` (DESIGN contract 4 cache keys).

* statistics: key = content of the prediction CSVs + the section + statistics code version.
* heatmaps (one task per slide): key = content of the slide's feature h5 and of the checkpoint
  + output folder and drawing parameters + heatmaps code version. The slide itself is read only
  for the thumbnail and top tiles; its content is already pinned by the h5's ``slide_sha256``.

Tasks return paths and small dicts; plots and arrays stay on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task

from stamp.config_models import StatisticsConfig
from stamp.hashing import package_code_hash
from stamp_tasks.cache import content_cache_policy

_STAMP = Path(__file__).resolve().parent.parent / "stamp"
STATISTICS_CODE_VERSION = package_code_hash(_STAMP / "statistics")
HEATMAPS_CODE_VERSION = package_code_hash(_STAMP / "heatmaps")

STATISTICS_CACHE = content_cache_policy(STATISTICS_CODE_VERSION, content_args=("pred_csvs",))
HEATMAPS_CACHE = content_cache_policy(
    HEATMAPS_CODE_VERSION, content_args=("h5_path", "checkpoint_path"), ignore_args=("slide_path", "run")
)


@task(name="statistics", cache_policy=STATISTICS_CACHE, persist_result=True)
def statistics_task(pred_csvs: list[str], section: dict[str, Any]) -> dict[str, Any]:
    """Metrics, CIs and plots for ``pred_csvs`` (the section's); returns files, rows, plots, summary."""
    from stamp.statistics import compute_statistics

    sec = StatisticsConfig.model_validate({**section, "pred_csvs": pred_csvs})
    result = compute_statistics(sec)
    return {
        "files": [str(p) for p in result.files],
        "plots": [str(p) for p in result.plots],
        "rows": result.rows,
        "summary": result.summary_markdown,
    }


@task(name="heatmap-slide", cache_policy=HEATMAPS_CACHE, persist_result=True)
def heatmap_slide(
    slide_path: str,
    h5_path: str,
    checkpoint_path: str,
    out_dir: str,
    name: str,
    params: dict[str, Any],
    run: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Heatmaps, overlays, top/bottom tiles and GeoJSON of one slide; returns its files and top tiles."""
    from stamp.heatmaps import HeatmapJob, render_slide

    start = time.perf_counter()
    job = HeatmapJob(
        slide_path=Path(slide_path), feature_path=Path(h5_path), output_dir=Path(out_dir), name=name
    )
    result = render_slide(job, Path(checkpoint_path), device=(run or {}).get("device", "cpu"), **params)
    return {**result.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
