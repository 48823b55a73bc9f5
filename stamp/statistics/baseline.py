"""The mean-pool baseline beside the model's statistics (ours; STAMP has no baseline).

``stamp crossval`` writes ``baseline-preds.csv`` beside each fold's ``patient-preds.csv``: the
predictions of a mean-pooled-features + logistic / ridge / Cox model fitted on the same training
patients, with the same columns. When every configured prediction CSV has such a file beside it,
the statistics add the baseline's headline figures: per file and as the same aggregate (Student-t
interval over the files, or the single file's value), in ``mean-pool-baseline_stats.csv``, in the
metric rows (``level="baseline"``, the keys of the aggregate rows) and in the summary, next to the
model's. Nothing of STAMP's outputs changes; with no baseline files nothing is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stamp.escaping import markdown_cell
from stamp.statistics.bootstrap import t_interval
from stamp.statistics.outcome import Outcome
from stamp.statistics.tables import Source, json_row, read_preds, write_table

__all__ = ["BASELINE_PREDS_NAME", "BASELINE_STATS_NAME", "baseline_sources", "baseline_statistics"]

BASELINE_PREDS_NAME = "baseline-preds.csv"  # = stamp.modeling.baseline.BASELINE_PREDS_NAME (no torch here)
BASELINE_STATS_NAME = "mean-pool-baseline_stats.csv"
_LABEL = "mean-pool baseline"


def baseline_sources(sources: Sequence[Source]) -> list[Source]:
    """The ``baseline-preds.csv`` beside each source, or ``[]`` unless every source has one."""
    found = []
    for src in sources:
        sibling = src.path.parent / BASELINE_PREDS_NAME
        if src.path.name == BASELINE_PREDS_NAME or not sibling.is_file():
            return []
        found.append(Source(sibling.resolve(), f"{src.label} ({_LABEL})", f"{src.slug}_baseline"))
    return found


def _classification(
    sources: Sequence[Source], targets: Sequence[str], classes: dict[str, list[str]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from stamp.statistics.classification import METRICS, _aggregate_row, class_metrics
    from stamp.statistics.tables import classification_data

    frames = [read_preds(s.path) for s in sources]
    per_file: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for target in targets:
        for cls in classes[target]:
            values: dict[str, list[float]] = {m: [] for m in METRICS}
            count = 0
            for src, df in zip(sources, frames, strict=True):
                data = classification_data(df, src.path, target, targets)
                if cls not in data.classes or not (data.y == data.classes.index(cls)).any():
                    continue
                m = class_metrics(data, data.classes.index(cls))
                per_file.append({"source": src.label, "target": target, "class": cls, **m})
                count += m["count"]
                for metric in METRICS:
                    values[metric].append(m[metric])
            if not values[METRICS[0]]:
                continue
            agg: dict[str, Any] = {
                "class": cls,
                "count": count,
                "n_sources": len(values[METRICS[0]]),
                "ci_method": "t-interval",
            }
            for metric in METRICS:
                mean, lo, hi = t_interval(values[metric], bounds=(0.0, 1.0))
                agg[f"{metric}_mean"], agg[f"{metric}_ci_low"], agg[f"{metric}_ci_high"] = mean, lo, hi
            row = _aggregate_row(target, agg)
            row.update(level="baseline", source=f"{_LABEL} ({agg['n_sources']} files, t-interval)")
            rows.append(row)
    return per_file, rows


def _regression(sources: Sequence[Source], target: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from stamp.statistics.regression import METRIC_BOUNDS, REGRESSION_METRICS, _pairs, regression_metrics

    per_file = []
    for src in sources:
        y, pred = _pairs(read_preds(src.path), src.path, target)
        per_file.append({"source": src.label, **regression_metrics(y, pred)})
    flat: dict[str, Any] = {
        "level": "baseline",
        "target": target,
        "source": f"{_LABEL} ({len(per_file)} files, t-interval)",
        "count": int(sum(r["count"] for r in per_file)),
    }
    for metric in REGRESSION_METRICS:
        mean, lo, hi = t_interval([r[metric] for r in per_file], bounds=METRIC_BOUNDS.get(metric))
        flat[metric], flat[f"{metric}_lo"], flat[f"{metric}_hi"] = mean, lo, hi
    return per_file, [flat]


def _survival(
    sources: Sequence[Source], time_label: str | None, status_label: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from stamp.statistics.survival import _flat, survival_columns, survival_data, survival_metrics

    per_file = []
    for src in sources:
        df = read_preds(src.path)
        t_col, s_col = survival_columns(df, src.path, time_label, status_label)
        risk, time, event, cut_off = survival_data(df, src.path, t_col, s_col)
        threshold = cut_off if cut_off is not None else float(np.median(risk))
        try:
            per_file.append({"source": src.label, **survival_metrics(risk, time, event, threshold)})
        except (ValueError, ZeroDivisionError):
            continue
    if not per_file:
        return [], []
    mean, lo, hi = t_interval([r["c_index"] for r in per_file], bounds=(0.0, 1.0))
    total = {k: sum(r[k] for r in per_file) for k in ("count", "events", "censored")}
    agg = {"source": f"{_LABEL} ({len(per_file)} files, t-interval)", **total, "threshold_from": ""}
    return per_file, [_flat("baseline", agg, mean, lo, hi)]


def _headline(task: str, row: dict[str, Any]) -> tuple[str, float, float, float]:
    key = {"classification": "roc_auc_score", "regression": "pearson_r", "survival": "c_index"}[task]
    name = {"classification": "AUROC", "regression": "Pearson r", "survival": "C-index"}[task]
    return name, float(row[key]), float(row[f"{key}_lo"]), float(row[f"{key}_hi"])


def _ci(lo: float, hi: float) -> str:
    return f" [{lo:.2f}–{hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def baseline_statistics(
    task: str,
    sources: Sequence[Source],
    out_dir: Path,
    model_rows: Sequence[dict[str, Any]],
    *,
    targets: Sequence[str] = (),
    classes: dict[str, list[str]] | None = None,
    time_label: str | None = None,
    status_label: str | None = None,
) -> Outcome:
    """Baseline table, rows and summary lines; ``model_rows`` are the model's metric rows (their
    ``level="aggregate"`` rows, or the single file's, give the model's figure in the summary)."""
    outcome = Outcome()
    if task == "classification":
        per_file, rows = _classification(sources, targets, classes or {})
    elif task == "regression":
        per_file, rows = _regression(sources, targets[0])
    else:
        per_file, rows = _survival(sources, time_label, status_label)
    if not rows:
        return outcome
    outcome.files.append(write_table(pd.DataFrame(per_file), out_dir / BASELINE_STATS_NAME))
    outcome.rows += [json_row(r) for r in rows]
    model_level = "aggregate" if any(r.get("level") == "aggregate" for r in model_rows) else "file"
    for row in rows:
        name, mean, lo, hi = _headline(task, row)
        what = ""
        model = [r for r in model_rows if r.get("level") == model_level]
        if task == "classification":
            what = f" ({markdown_cell(row['target'])} = {markdown_cell(row['class'])})"
            model = [r for r in model if r.get("target") == row["target"] and r.get("class") == row["class"]]
        line = f"- **{_LABEL}**{what}: {name} {mean:.3f}{_ci(lo, hi)}"
        if len(model) == 1:
            _, m_mean, m_lo, m_hi = _headline(task, model[0])
            line += f"; the model: {m_mean:.3f}{_ci(m_lo, m_hi)}"
            if np.isfinite(m_lo) and np.isfinite(m_hi) and mean - m_mean > (m_hi - m_lo) / 2:
                line += " — the model is worse than the baseline by more than its 95% CI"
        outcome.summary.append(line)
    return outcome
