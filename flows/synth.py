"""``stamp synth``: write a synthetic cohort as a Prefect flow (cached, with an artifact table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from stamp.logs import logger
from stamp_tasks.cache import run_ensuring_outputs
from stamp_tasks.synth import cohort_outputs, write_synthetic_cohort


@flow(name="synth", log_prints=False)
def synth_flow(
    out: str, patients: int = 12, seed: int = 0, size: int | None = None, variants: bool = True
) -> dict[str, Any]:
    """Write (or reuse from the cache) a synthetic cohort under ``out``; publish its slide table."""
    out = str(Path(out).resolve())
    result = run_ensuring_outputs(
        write_synthetic_cohort, out, patients, seed, size, variants, outputs=cohort_outputs
    )
    create_table_artifact(key="synthetic-cohort", table=result["table"], description=result["summary"])
    logger.info(result["summary"])
    return result
