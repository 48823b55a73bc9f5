"""``stamp preprocess``: one Prefect task per slide, cached on slide content + parameters.

Slides go in a per-process shuffled order (like STAMP) so several runs on one output
folder mostly work on different slides; a slide another run is writing is reported as
skipped, a slide another run has finished comes from the shared cache. The run ends
with an artifact table, ``summary.md`` in the feature folder and per-status counts.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from tqdm import tqdm

from stamp.config_models import PreprocessingConfig, resolve_device
from stamp.encoders import encoder_weights_digest, get_spec
from stamp.escaping import markdown_cell, markdown_code
from stamp.fileio import atomic_write_text, sweep_temps
from stamp.hashing import shared_index
from stamp.logs import logger
from stamp.preprocessing import (
    SlideFailed,
    SlideReport,
    colliding_outputs,
    feature_dir,
    h5_path_for,
    params_from_config,
    serve_cached,
    slide_provenance,
    up_to_date_report,
)
from stamp.provenance import Provenance
from stamp.slidelock import SlideLocked
from stamp.slides import find_slides
from stamp_flows.phi import artifact_rows, artifact_text, run_label
from stamp_flows.runners import thread_pool
from stamp_tasks.preprocess import PREPROCESS_CODE_VERSION, preprocess_slide


class _NoTracebackForSlideFailures(logging.Filter):
    """A slide that cannot be processed is an expected outcome: log its one-line reason only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (SlideFailed, SlideLocked)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoTracebackForSlideFailures())

TABLE_COLUMNS = (
    "slide",
    "status",
    "reason",
    "mpp",
    "mpp_effective",
    "tiles_kept",
    "tiles_rejected",
    "seconds",
)


def _row(
    slide: Path, wsi_dir: Path, status: str, report: dict[str, Any] | None, reason: str = ""
) -> dict[str, Any]:
    try:
        name = str(slide.resolve().relative_to(wsi_dir.resolve()))
    except ValueError:
        name = slide.name
    r = report or {}
    rejected = int(r.get("rejected_background", 0)) + int(r.get("rejected_canny", 0))
    return {
        "slide": name,
        "status": status,
        "reason": reason,
        "mpp": r.get("mpp"),
        "mpp_effective": round(r["mpp_effective"], 4) if r.get("mpp_effective") else None,
        "tiles_kept": r.get("tiles_kept", 0),
        "tiles_rejected": rejected,
        "seconds": round(float(r.get("seconds", 0.0)), 2),
    }


def _reason(exc: BaseException, slide: Path) -> str:
    """The exception's first line without a leading ``<slide name>: `` (the table names the slide)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix(f"{slide.name}: ")


def _up_to_date(slide: Path, h5: Path, expected: Any) -> SlideReport | None:
    """The report of a slide whose outputs need no task, or None (also when checking fails: the task
    then reports why)."""
    try:
        return up_to_date_report(slide, h5, expected())
    except Exception:  # unreadable slide or output: the slide's task says what is wrong
        return None


def _collect(
    future: PrefectFuture[Any], slide: Path, wsi_dir: Path, h5: Path, submit: Any, expected: Any
) -> dict[str, Any]:
    future.wait()  # also refreshes future.state
    state = future.state
    if state.is_completed():
        report = future.result()
        if state.name == "Cached":
            why = serve_cached(report, slide, h5, expected())
            if why is not None:  # the outputs are not what the cache says: compute (or reuse) on disk
                logger.info("%s: cached result not served (%s)", slide.name, why)
                future = submit(refresh=True)
                future.wait()
                return _collect(future, slide, wsi_dir, h5, submit, expected)
            report["h5"] = str(h5)
            return _row(slide, wsi_dir, "cached", report)
        if report.get("status") == "reused":  # outputs whose provenance matches (cache record lost)
            return _row(slide, wsi_dir, "cached", report, "reused the finished outputs (same provenance)")
        return _row(slide, wsi_dir, "done", report)
    try:
        future.result()
    except Exception as exc:
        status = "skipped" if "being processed by" in str(exc) else "failed"
        return _row(slide, wsi_dir, status, None, _reason(exc, slide))
    return _row(slide, wsi_dir, "failed", None, f"task ended in state {state.name}")


def _summary_md(rows: list[dict[str, Any]], counts: dict[str, int], feat_dir: Path) -> str:
    head = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
    body = "".join("| " + " | ".join(markdown_cell(r.get(c)) for c in TABLE_COLUMNS) + " |\n" for r in rows)
    totals = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"# preprocess summary\n\nfeatures: {markdown_code(feat_dir)}\n\n{totals}\n\n{head}{body}"


@flow(name="preprocess", task_runner=thread_pool(2))
def preprocess_flow(config: dict[str, Any], shard: int = 0, shards: int = 1) -> dict[str, Any]:
    """Preprocess every slide of a ``preprocessing`` config section (given as a dict).

    ``shard``/``shards``: this run takes every ``shards``-th slide of the sorted slide list,
    starting at ``shard`` — so N runs (e.g. N deployments on N GPU nodes) split a cohort.
    """
    cfg = PreprocessingConfig.model_validate(config)
    if not 0 <= shard < shards:
        raise ValueError(f"preprocess: shard must be in [0, {shards}), got {shard}")
    start = time.perf_counter()
    wsi_dir = Path(cfg.wsi_dir)
    slides = sorted(find_slides(wsi_dir, cfg.wsi_list))[shard::shards]
    random.Random().shuffle(slides)  # system entropy: concurrent runs start on different slides
    feat_dir = feature_dir(cfg, PREPROCESS_CODE_VERSION)
    sweep_temps(feat_dir)  # what a killed run left behind
    device = resolve_device(cfg.device)
    # the weights are verified now (fail fast); the network is built by the first slide that needs it
    weights_sha256 = encoder_weights_digest(cfg.extractor, weights_dir=cfg.weights_dir, strict=True)
    if not get_spec(cfg.extractor).research_use:
        logger.warning("extractor %r is NOT for research use (demo/testing only)", cfg.extractor)
    if cfg.cache_dir is not None:
        logger.warning(
            "preprocessing.cache_dir is accepted for STAMP compatibility but not used: tiles are not cached"
        )
    params = params_from_config(cfg)
    run = {
        "weights_dir": str(cfg.weights_dir) if cfg.weights_dir else None,
        "device": device,
        "batch_size": cfg.batch_size,
        "max_workers": cfg.max_workers,
    }
    logger.info("preprocess: %d slides → %s (encoder %s on %s)", len(slides), feat_dir, cfg.extractor, device)

    h5_paths = {slide: h5_path_for(slide, wsi_dir, feat_dir) for slide in slides}
    collisions = colliding_outputs(h5_paths)
    rows = [
        _row(slide, wsi_dir, "failed", None, collisions[slide]) for slide in slides if slide in collisions
    ]
    jobs = []
    number = {slide: i for i, slide in enumerate(sorted(slides), 1)}
    for slide in (s for s in slides if s not in collisions):
        h5 = h5_paths[slide]

        def submit(refresh: bool = False, slide: Path = slide, h5: Path = h5) -> PrefectFuture[Any]:
            task = preprocess_slide.with_options(
                task_run_name=run_label("preprocess", slide.name, number[slide]), refresh_cache=refresh
            )
            return task.submit(str(slide), str(h5), params.cache_params(), weights_sha256, run)

        def expected(slide: Path = slide) -> Provenance:
            digest = shared_index().sha256(slide)
            return slide_provenance(digest, params, weights_sha256, PREPROCESS_CODE_VERSION)

        finished = _up_to_date(slide, h5, expected)
        if finished is not None:  # no task run: the outputs' own provenance already says so
            rows.append(_row(slide, wsi_dir, "cached", finished.as_dict()))
            continue
        jobs.append((slide, h5, submit, expected, submit()))
    if len(jobs) < len(slides) - len(collisions):
        logger.info(
            "preprocess: %d of %d slides up to date (their outputs' provenance matches), no task run for them",
            len(slides) - len(collisions) - len(jobs),
            len(slides),
        )
    by_future = {job[4]: job for job in jobs}
    with tqdm(total=len(jobs), desc="slides", unit="slide", disable=not sys.stderr.isatty()) as bar:
        for i, future in enumerate(as_completed(list(by_future)), 1):
            slide, h5, submit, expected, _ = by_future[future]
            row = _collect(future, slide, wsi_dir, h5, submit, expected)
            rows.append(row)
            bar.update()
            logger.info("[%d/%d] %s: %s %s", i, len(jobs), row["slide"], row["status"], row["reason"])
    rows.sort(key=lambda r: r["slide"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "cached", "skipped", "failed")}
    feat_dir.mkdir(parents=True, exist_ok=True)
    summary = _summary_md(rows, counts, feat_dir)
    atomic_write_text(feat_dir / "summary.md", summary)
    create_table_artifact(
        key="preprocess-slides",
        table=artifact_rows(rows, "slide", ("reason",)),
        description=f"features in {feat_dir}",
    )
    totals = ", ".join(f"{n} {status}" for status, n in counts.items())
    redacted = f"# preprocess summary\n\n{totals}\n\nPer-slide details: summary.md in the feature folder."
    create_markdown_artifact(key="preprocess-summary", markdown=artifact_text(summary, redacted))
    return {
        "feature_dir": str(feat_dir),
        "rows": rows,
        "counts": counts,
        "seconds": time.perf_counter() - start,
    }


def run_preprocess(cfg: PreprocessingConfig, task_concurrency: int) -> dict[str, Any]:
    """Run :func:`preprocess_flow` with ``task_concurrency`` slides at a time."""
    return preprocess_flow.with_options(task_runner=thread_pool(task_concurrency))(
        config=cfg.model_dump(mode="json")
    )


def summary_line(result: dict[str, Any]) -> str:
    """One line for the terminal: counts per status and where the features are."""
    counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
    return f"preprocess: {counts or 'no slides'} in {result['seconds']:.1f} s → {result['feature_dir']}"
