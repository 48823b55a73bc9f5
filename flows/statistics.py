"""``stamp statistics`` as a Prefect flow: one cached task over the prediction CSVs; publishes the metrics
table (``statistics-metrics``) and the ROC/PR/KM/scatter plots inline (``statistics-plots``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from stamp.config_models import StatisticsConfig
from stamp.escaping import markdown_code
from stamp.fileio import sweep_temps
from stamp.logs import logger
from stamp_flows import logfilters
from stamp_flows.images import inline_png
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.statistics import statistics_task

logfilters.install()


@flow(name="statistics", task_runner=thread_pool(1))
def statistics_flow(section: dict[str, Any]) -> dict[str, Any]:
    """STAMP's statistics for a ``statistics`` section: tables with 95 % CIs and plots."""
    start = time.perf_counter()
    sec = StatisticsConfig.model_validate(section)
    csvs = [str(Path(p)) for p in sec.pred_csvs]
    missing = [p for p in csvs if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"statistics.pred_csvs: {missing[0]} does not exist"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; run crossval/deploy first or fix the path"
        )
    from stamp.statistics.api import check_statistics

    sweep_temps(Path(sec.output_dir), recursive=False)
    result = served_or_recomputed(
        statistics_task.submit(csvs, section),
        lambda r: check_statistics(sec, [Path(f) for f in r["files"]]),
        lambda: statistics_task.with_options(refresh_cache=True).submit(csvs, section),
    )
    create_table_artifact(key="statistics-metrics", table=result["rows"], description=f"in {sec.output_dir}")
    images = "\n\n".join(f"{inline_png(p)}\n\n{markdown_code(p)}" for p in result["plots"][:8])
    create_markdown_artifact(key="statistics-plots", markdown=f"{result['summary']}\n\n{images}\n")
    logger.info("statistics: %d files in %s", len(result["files"]), sec.output_dir)
    return {**result, "output_dir": str(sec.output_dir), "seconds": time.perf_counter() - start}
