"""``compute_statistics``: the whole ``stamp statistics`` command as one plain function.

Its tables and plots are one output unit (:mod:`stamp.provenance`) named after the task and
target(s), recorded with the prediction files' digests: statistics for another target can share
the folder, files we did not write are never replaced, and the result says which prediction files
(and digests) it used.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from stamp.config_models import StatisticsConfig
from stamp.escaping import markdown_cell, markdown_code
from stamp.fileio import staging_dir
from stamp.hashing import package_code_hash, shared_index
from stamp.provenance import Check, Provenance, check_files, publish_files
from stamp.statistics.baseline import baseline_sources, baseline_statistics
from stamp.statistics.outcome import Outcome
from stamp.statistics.tables import Source, StatisticsError, read_preds, safe_name, sources_for

__all__ = ["StatisticsResult", "check_statistics", "compute_statistics", "statistics_code_version"]


@dataclass
class StatisticsResult:
    """What :func:`compute_statistics` wrote and found.

    ``files``: every file written (CSVs, SVGs, PNGs); ``plots``: the PNGs; ``rows``: a flat,
    JSON-safe metrics table (one dict per CSV × target × class plus ``level="aggregate"`` rows; the
    keys are the same within one task; NaN is ``None``); ``summary_markdown``: headline numbers.
    """

    files: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    summary_markdown: str = ""
    inputs: list[dict[str, str]] = field(default_factory=list)  # {"file", "label", "sha256"} per CSV


@cache
def statistics_code_version() -> str:
    """sha256 over the statistics package's sources."""
    return package_code_hash(Path(__file__).resolve().parent)


def unit_name(sec: StatisticsConfig) -> str:
    """The output unit of a statistics run: ``statistics-<task>-<target(s)>`` (file-name safe)."""
    if sec.task == "survival":
        what = f"{sec.time_label}+{sec.status_label}"
    else:
        gt = sec.ground_truth_label
        what = "+".join(gt) if isinstance(gt, list) else str(gt)
    return safe_name(f"statistics-{sec.task}-{what}")


def _provenance(sec: StatisticsConfig, sources: list[Source], n_bootstrap: int, seed: int) -> Provenance:
    index = shared_index()
    settings = sec.model_dump(mode="json", exclude={"output_dir", "pred_csvs"})
    return Provenance(
        stage="statistics",
        inputs={src.label: index.sha256(src.path) for src in [*sources, *baseline_sources(sources)]},
        settings={
            **settings,
            "labels": [src.label for src in sources],
            "n_bootstrap": n_bootstrap,
            "seed": seed,
        },
        code=statistics_code_version(),
    )


def check_statistics(
    sec: StatisticsConfig, files: list[Path], *, n_bootstrap: int = 1000, seed: int = 0
) -> Check:
    """:class:`stamp.provenance.Check` of a statistics run's ``files`` against what ``sec`` would write."""
    out_dir = Path(sec.output_dir)
    expected = _provenance(sec, sources_for(sec.pred_csvs), n_bootstrap, seed)
    names = [os.path.relpath(f, out_dir) for f in files]
    return check_files(out_dir, unit_name(sec), names, expected)


def compute_statistics(sec: StatisticsConfig, *, n_bootstrap: int = 1000, seed: int = 0) -> StatisticsResult:
    """Metrics tables and plots for ``sec.pred_csvs`` under ``sec.output_dir`` (file names as STAMP's).

    Raises :class:`StatisticsError` (a ``ValueError``) with one line naming the CSV and column for
    bad input. ``n_bootstrap`` / ``seed`` drive the single-CSV bootstrap intervals and ROC/PR bands.
    """
    if n_bootstrap < 1:
        raise StatisticsError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    sources = sources_for(sec.pred_csvs)
    frames = [read_preds(src.path) for src in sources]
    out_dir = Path(sec.output_dir)
    expected = _provenance(sec, sources, n_bootstrap, seed)
    with staging_dir(out_dir / unit_name(sec)) as staging:
        result = _compute(sec, sources, frames, staging, n_bootstrap, seed)
        names = [os.path.relpath(f, staging) for f in result.files]
        publish_files(out_dir, unit_name(sec), {n: staging / n for n in names}, expected)
        shutil.rmtree(staging, ignore_errors=True)
    result.files = [out_dir / os.path.relpath(f, staging) for f in result.files]
    result.plots = [out_dir / os.path.relpath(f, staging) for f in result.plots]
    result.inputs = [
        {"file": str(src.path), "label": src.label, "sha256": str(expected.inputs[src.label])}
        for src in [*sources, *baseline_sources(sources)]
    ]
    used = ["", "| prediction file | sha256 |", "|---|---|"]
    used += [f"| {markdown_code(i['file'])} | `{i['sha256'][:16]}` |" for i in result.inputs]
    result.summary_markdown += "\n".join(used) + "\n"
    return result


def _compute(
    sec: StatisticsConfig,
    sources: list[Source],
    frames: list[Any],
    out_dir: Path,
    n_bootstrap: int,
    seed: int,
) -> StatisticsResult:
    if sec.task == "classification":
        from stamp.statistics.classification import classification_statistics
        from stamp.statistics.tables import classification_targets

        targets = classification_targets(frames[0], sources[0].path, sec.ground_truth_label)
        outcome: Outcome = classification_statistics(
            sources, frames, targets, out_dir, true_class=sec.true_class, n_bootstrap=n_bootstrap, seed=seed
        )
        heading = f"Classification statistics ({', '.join(map(markdown_cell, targets))})"
    elif sec.task == "regression":
        from stamp.statistics.regression import regression_statistics, regression_target

        target = regression_target(frames[0], sources[0].path, sec.ground_truth_label)
        outcome = regression_statistics(sources, frames, target, out_dir, n_bootstrap=n_bootstrap, seed=seed)
        heading = f"Regression statistics ({markdown_cell(target)})"
    else:
        from stamp.statistics.survival import survival_statistics

        outcome = survival_statistics(
            sources, frames, out_dir, time_label=sec.time_label, status_label=sec.status_label
        )
        heading = "Survival statistics"
    base = baseline_sources(sources)
    if base:
        targets_: list[str] = []
        classes: dict[str, list[str]] = {}
        if sec.task == "classification":
            for row in outcome.rows:
                if row.get("level") != "aggregate":
                    continue
                t, c = str(row["target"]), str(row["class"])
                if sec.true_class is None or sec.true_class == c:
                    targets_ += [t] if t not in targets_ else []
                    classes.setdefault(t, []).append(c)
        elif sec.task == "regression":
            targets_ = [target]
        extra = baseline_statistics(
            sec.task,
            base,
            out_dir,
            outcome.rows,
            targets=targets_,
            classes=classes,
            time_label=sec.time_label,
            status_label=sec.status_label,
        )
        outcome.files += extra.files
        outcome.rows += extra.rows
        outcome.summary += extra.summary
    files = ", ".join(markdown_code(s.label) for s in sources[:6]) + (" …" if len(sources) > 6 else "")
    summary = "\n".join(
        [f"### {heading}", f"{len(sources)} prediction file(s): {files}", "", *outcome.summary]
    )
    return StatisticsResult(outcome.files, outcome.rows, outcome.plots, summary + "\n")
