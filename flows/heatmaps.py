"""``stamp heatmaps`` as a Prefect flow: one cached task per slide (fan-out); publishes a per-slide table
(``heatmaps-slides``) and a gallery of overview images (``heatmaps-gallery``). A slide that fails is
reported in the table and never stops the others."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from stamp.config_models import HeatmapsConfig, resolve_device
from stamp.escaping import markdown_cell
from stamp.fileio import sweep_temps
from stamp.logs import logger
from stamp_flows import logfilters
from stamp_flows.images import inline_png
from stamp_flows.phi import artifact_rows, redacting, run_label
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.heatmaps import heatmap_slide

logfilters.install()


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
    from stamp.heatmaps.render import check_heatmaps, finished_heatmaps

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

    rows, results, futures = [], [], []
    for job in plan.jobs:
        finished = finished_heatmaps(job, sec.checkpoint_path, **params)
        if finished is not None:  # no task run: the folder's own record says it is what we would draw
            results.append(finished)
            rows.append(_slide_row(job, "done", finished))
        else:
            futures.append((job, submit(job)))
    if len(futures) < len(plan.jobs):
        logger.info(
            "heatmaps: %d of %d slides up to date (their folders' provenance matches), no task run for them",
            len(plan.jobs) - len(futures),
            len(plan.jobs),
        )
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
