"""Prefect task that writes a synthetic cohort (cached on its parameters and the generator code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from stamp.synthetic import generator_code_hash, synth_command
from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import RESULT_OPTIONS

SYNTH_CODE_VERSION = generator_code_hash()[:16]
SYNTH_CACHE = content_cache_policy(SYNTH_CODE_VERSION, content_args=())


@task(name="write-synthetic-cohort", cache_policy=SYNTH_CACHE, **RESULT_OPTIONS)
def write_synthetic_cohort(
    out: str, patients: int, seed: int, size: int | None, variants: bool
) -> dict[str, Any]:
    """Write the cohort to ``out``; return its table/slide paths and a one-line summary."""
    info = synth_command(Path(out), patients=patients, seed=seed, size=size, variants=variants)
    return {
        "root": str(info.root),
        "clini_table": str(info.clini_table),
        "slide_table": str(info.slide_table),
        "truth_json": str(info.truth_json),
        "slides_dir": str(info.slides_dir),
        "slides": [str(rec.truth.slide_path) for rec in info.slides],
        "summary": info.summary,
        "table": [
            {
                "slide": Path(rec.truth.slide_path).name,
                "patient": rec.patient,
                "label": rec.label,
                "mpp": rec.truth.mpp,
                "size_px": f"{rec.truth.width}x{rec.truth.height}",
                "tissue_fraction": round(rec.truth.tissue_fraction, 3),
                "planted_fraction": round(rec.truth.planted_fraction, 3),
            }
            for rec in info.slides
        ],
    }
