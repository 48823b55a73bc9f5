"""``compute_statistics``: the whole ``stamp statistics`` command as one plain function."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamp.config_models import StatisticsConfig
from stamp.statistics.outcome import Outcome
from stamp.statistics.tables import StatisticsError, read_preds, sources_for

__all__ = ["StatisticsResult", "compute_statistics"]


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
    out_dir.mkdir(parents=True, exist_ok=True)
    if sec.task == "classification":
        from stamp.statistics.classification import classification_statistics
        from stamp.statistics.tables import classification_targets

        targets = classification_targets(frames[0], sources[0].path, sec.ground_truth_label)
        outcome: Outcome = classification_statistics(
            sources, frames, targets, out_dir, true_class=sec.true_class, n_bootstrap=n_bootstrap, seed=seed
        )
        heading = f"Classification statistics ({', '.join(targets)})"
    elif sec.task == "regression":
        from stamp.statistics.regression import regression_statistics, regression_target

        target = regression_target(frames[0], sources[0].path, sec.ground_truth_label)
        outcome = regression_statistics(sources, frames, target, out_dir, n_bootstrap=n_bootstrap, seed=seed)
        heading = f"Regression statistics ({target})"
    else:
        from stamp.statistics.survival import survival_statistics

        outcome = survival_statistics(
            sources, frames, out_dir, time_label=sec.time_label, status_label=sec.status_label
        )
        heading = "Survival statistics"
    files = ", ".join(f"`{s.label}`" for s in sources[:6]) + (" …" if len(sources) > 6 else "")
    summary = "\n".join(
        [f"### {heading}", f"{len(sources)} prediction file(s): {files}", "", *outcome.summary]
    )
    return StatisticsResult(outcome.files, outcome.rows, outcome.plots, summary + "\n")
