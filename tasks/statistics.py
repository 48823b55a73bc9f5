"""Prefect task for ``statistics`` (DESIGN contract 4): key = content of the prediction CSVs + the section
+ statistics code version. Returns paths and small dicts (JSON results); plots stay on disk."""

from __future__ import annotations

from typing import Any

from prefect import task

from stamp.config_models import StatisticsConfig
from stamp.statistics.api import statistics_code_version
from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import RESULT_OPTIONS

STATISTICS_CACHE = content_cache_policy(statistics_code_version(), content_args=("pred_csvs",))


@task(name="statistics", cache_policy=STATISTICS_CACHE, **RESULT_OPTIONS)
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
        "inputs": result.inputs,
    }
