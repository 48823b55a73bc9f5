"""Prefect task for ``heatmaps``, one per slide (DESIGN contract 4): key = content of the slide, its feature
h5 and the checkpoint + output folder and drawing parameters + heatmaps code version. Returns paths and small
dicts (JSON results); images and arrays stay on disk, published with their provenance by the library."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task

from stamp.heatmaps.render import heatmaps_code_version
from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import RESULT_OPTIONS

HEATMAPS_CACHE = content_cache_policy(
    heatmaps_code_version(), content_args=("slide_path", "h5_path", "checkpoint_path"), ignore_args=("run",)
)


@task(name="heatmap-slide", cache_policy=HEATMAPS_CACHE, **RESULT_OPTIONS)
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
