"""``stamp statistics`` and ``stamp heatmaps`` as Prefect flows, with artifacts for the UI.

* ``statistics``: one cached task over the prediction CSVs; publishes the metrics table
  (``statistics-metrics``) and the ROC/PR/KM/scatter plots inline (``statistics-plots``).
* ``heatmaps``: one cached task per slide (fan-out); publishes a per-slide table
  (``heatmaps-slides``) and a gallery of overview images (``heatmaps-gallery``). A slide that
  fails is reported in the table and never stops the others.

Images go into markdown artifacts as small inline PNGs (the UI renders ``data:`` images; they
work offline); the full-size files stay on disk and are named beside them.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from stamp.config_models import HeatmapsConfig, StatisticsConfig, resolve_device
from stamp.escaping import markdown_cell, markdown_code
from stamp.fileio import sweep_temps
from stamp.logs import logger
from stamp_flows import logfilters
from stamp_flows.phi import artifact_rows, redacting, run_label
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.report import heatmap_slide, statistics_task

logfilters.install()

ARTIFACT_KEYS = ("statistics-metrics", "statistics-plots", "heatmaps-slides", "heatmaps-gallery")


def inline_png(path: str | Path, width: int = 360) -> str:
    """Markdown for a PNG shrunk to ``width`` px, inline as base64 (keeps artifacts small)."""
    from PIL import Image

    with Image.open(path) as opened:
        img = opened.convert("RGB")
    if img.width > width:
        img = img.resize((width, max(1, round(img.height * width / img.width))))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![{markdown_cell(Path(path).name)}](data:image/png;base64,{data})"


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


def _slide_row(job: Any, status: str, value: dict[str, Any] | None, reason: str = "") -> dict[str, Any]:
    v = value or {}
    return {
        "slide": job.name,
        "status": status,
        "reason": reason,
        "tiles": v.get("n_tiles"),
        "predicted": v.get("predicted"),
        "seconds": v.get("seconds"),
        "overview": v.get("overview"),
    }


@flow(name="heatmaps", task_runner=thread_pool(2))
def heatmaps_flow(section: dict[str, Any]) -> dict[str, Any]:
    """Heatmaps for every slide of a ``heatmaps`` section, one cached task per slide."""
    from stamp.heatmaps import plan_heatmaps
    from stamp.heatmaps.render import check_heatmaps

    start = time.perf_counter()
    sec = HeatmapsConfig.model_validate(section)
    sweep_temps(Path(sec.output_dir))  # what a killed run left behind
    plan = plan_heatmaps(sec)
    for skipped in plan.skipped:
        logger.warning("heatmaps: %s skipped: %s", skipped.slide_path, skipped.reason)
    params: dict[str, Any] = {"opacity": sec.opacity, "topk": sec.topk, "bottomk": sec.bottomk}
    params.update(default_slide_mpp=sec.default_slide_mpp, ig_steps=sec.ig_steps)
    run = {"device": resolve_device(sec.device)}

    number = {job.name: i for i, job in enumerate(plan.jobs, 1)}

    def submit(job: Any, refresh: bool = False) -> PrefectFuture[Any]:
        label = run_label("heatmap", job.name, number[job.name])
        task = heatmap_slide.with_options(task_run_name=label, refresh_cache=refresh)
        return task.submit(
            str(job.slide_path),
            str(job.feature_path),
            str(sec.checkpoint_path),
            str(job.output_dir),
            job.name,
            params,
            run,
        )

    futures = [(job, submit(job)) for job in plan.jobs]
    rows, results = [], []
    for job, fut in futures:
        fut.wait()
        try:
            value = served_or_recomputed(
                fut,
                lambda _r, job=job: check_heatmaps(job, sec.checkpoint_path, **params),
                lambda job=job: submit(job, refresh=True),
            )
        except Exception as exc:  # one bad slide never stops the others
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.error("heatmaps: %s failed: %s", job.name, reason)
            rows.append(_slide_row(job, "failed", None, reason))
            continue
        results.append(value)
        rows.append(_slide_row(job, "done", value))
    rows += [{"slide": str(s.slide_path), "status": "skipped", "reason": s.reason} for s in plan.skipped]
    create_table_artifact(
        key="heatmaps-slides",
        table=artifact_rows(rows, "slide", ("reason", "overview")),
        description=f"heatmaps in {sec.output_dir}",
    )
    if redacting():  # tissue images and slide names stay in the output folder
        gallery = f"{sum(r['status'] == 'done' for r in rows)} slide(s) rendered; the images are in the output folder."
    else:
        gallery = "\n\n".join(
            f"**{markdown_cell(r['slide'])}**\n\n{inline_png(r['overview'], 480)}"
            for r in rows[:6]
            if r.get("overview")
        )
    create_markdown_artifact(key="heatmaps-gallery", markdown=f"# heatmaps\n\n{gallery}\n")
    failed = sum(r["status"] == "failed" for r in rows)
    return {
        "output_dir": str(sec.output_dir),
        "slides": results,
        "rows": rows,
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }
