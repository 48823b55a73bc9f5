"""``stamp synth``: write a synthetic cohort as a Prefect flow (cached, with an artifact table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from stamp.logs import logger
from stamp.synthetic import DEFAULT_SIZE, check_cohort
from stamp_flows.runners import thread_pool
from stamp_tasks.cache import served_or_recomputed
from stamp_tasks.synth import write_synthetic_cohort


@flow(name="synth", log_prints=False, task_runner=thread_pool(1))
def synth_flow(
    out: str, patients: int = 12, seed: int = 0, size: int | None = None, variants: bool = True
) -> dict[str, Any]:
    """Write (or reuse from the cache) a synthetic cohort under ``out``; publish its slide table."""
    out = str(Path(out).resolve())
    args = (out, patients, seed, size, variants)
    result = served_or_recomputed(
        write_synthetic_cohort.submit(*args),
        lambda _r: check_cohort(Path(out), patients, seed, size or DEFAULT_SIZE, variants=variants),
        lambda: write_synthetic_cohort.with_options(refresh_cache=True).submit(*args),
    )
    create_table_artifact(key="synthetic-cohort", table=result["table"], description=result["summary"])
    logger.info(result["summary"])
    return result
