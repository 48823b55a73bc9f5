"""Survival statistics per CSV: C-index, log-rank p at a risk cut-off, Kaplan–Meier plot (lifelines).

``pred_score`` is a Cox risk (higher = worse), so the C-index is lifelines' ``concordance_index``
of ``-pred_score``. Patients split into low (``pred_score <= threshold``) and high risk; the
threshold is the value in a column named ``cut_off=<x>`` (the training median STAMP and we write)
or else this CSV's median risk. Columns: ``time_label`` / ``status_label`` when configured, else
``time`` / ``event`` (STAMP before PR #170), else the two columns after ``pred_score``.
Status values: ``1, event, dead, deceased, yes, y, true`` / ``0, alive, censored, no, false`` or
numbers (> 0 = event); empty and NA tokens drop the patient. Output ``survival-stats_individual.csv``
(no aggregate file, as STAMP) and ``plots/<label>_km_curve.svg/png`` with an at-risk table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stamp.statistics.bootstrap import t_interval
from stamp.statistics.outcome import Outcome
from stamp.statistics.plots import new_figure, save_figure
from stamp.statistics.tables import (
    Source,
    StatisticsError,
    json_row,
    numeric_column,
    require_columns,
    write_table,
)

__all__ = ["survival_columns", "survival_data", "survival_metrics", "survival_statistics"]

_EVENT = {"1", "1.0", "event", "dead", "deceased", "yes", "y", "true"}
_CENSORED = {"0", "0.0", "alive", "censored", "no", "false"}
_NA = {"", "na", "nan", "n/a", "#n/a", "-", "?", "none", "null", "<na>", "unknown", "missing"}


def survival_columns(
    df: pd.DataFrame, path: Path, time_label: str | None, status_label: str | None
) -> tuple[str, str]:
    """The (time, status) column names of ``df``; see the module docstring for the fallbacks."""
    require_columns(df, path, ["pred_score"], "task (this CSV has no survival 'pred_score' column)")
    if time_label is None or status_label is None:
        cols = list(df.columns)
        rest = [c for c in cols[cols.index("pred_score") + 1 :] if not c.startswith(("std_", "cut_off="))]
        if {"time", "event"} <= set(cols):
            guess = ("time", "event")
        elif len(rest) >= 2:
            guess = (rest[0], rest[1])
        else:
            raise StatisticsError(
                f"prediction CSV {path}: set statistics.time_label and statistics.status_label"
            )
        time_label, status_label = time_label or guess[0], status_label or guess[1]
    require_columns(df, path, [time_label], "time_label")
    require_columns(df, path, [status_label], "status_label")
    return time_label, status_label


def _status(values: pd.Series, path: Path, col: str) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for i, raw in enumerate(values):
        token = "" if pd.isna(raw) else str(raw).strip().lower()
        if token in _EVENT:
            out[i] = 1.0
        elif token in _CENSORED:
            out[i] = 0.0
        elif token not in _NA:
            try:
                out[i] = float(float(token) > 0)
            except ValueError:
                raise StatisticsError(
                    f"prediction CSV {path} column {col!r} holds {raw!r}: use 1/0 (or event/censored) for status"
                ) from None
    return out


def _cut_off(df: pd.DataFrame, path: Path) -> float | None:
    for col in reversed(list(df.columns)):
        if col.startswith("cut_off="):
            try:
                value = float(col.split("=", 1)[1])
            except ValueError:
                raise StatisticsError(
                    f"prediction CSV {path} column {col!r}: the cut-off is not a number"
                ) from None
            return value if math.isfinite(value) else None
    return None


def survival_data(
    df: pd.DataFrame, path: Path, time_label: str, status_label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
    """(risk, time, event) of patients with all three known, and the stored cut-off (or None)."""
    risk = numeric_column(df, "pred_score", path)
    time = numeric_column(df, time_label, path)
    event = _status(df[status_label], path, status_label)
    keep = np.isfinite(risk) & np.isfinite(time) & np.isfinite(event)
    if keep.sum() < 2:
        raise StatisticsError(
            f"prediction CSV {path} has {int(keep.sum())} patient(s) with {time_label!r}, {status_label!r} and "
            "'pred_score': survival statistics need labelled patients"
        )
    return risk[keep], time[keep], event[keep].astype(bool), _cut_off(df, path)


def survival_metrics(
    risk: np.ndarray, time: np.ndarray, event: np.ndarray, threshold: float
) -> dict[str, Any]:
    """``count, events, censored, comparable_pairs, c_index, logrank_p, threshold`` (lifelines)."""
    from lifelines.statistics import logrank_test
    from lifelines.utils import concordance_index

    if not event.any():
        raise ValueError("no events")
    c_index = float(concordance_index(time, -risk, event))
    try:
        from lifelines.utils.concordance import _concordance_summary_statistics

        pairs = float(_concordance_summary_statistics(time, -risk, event)[2])
    except Exception:  # private lifelines helper; the count is informative only
        pairs = float("nan")
    high = risk > threshold
    logrank_p = float("nan")
    if high.any() and (~high).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logrank_p = float(logrank_test(time[~high], time[high], event[~high], event[high]).p_value)
    return {
        "count": len(risk),
        "events": int(event.sum()),
        "censored": int((~event).sum()),
        "comparable_pairs": pairs,
        "c_index": c_index,
        "logrank_p": logrank_p,
        "threshold": float(threshold),
    }


def _km_plot(
    risk: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    threshold: float,
    title: str,
    time_label: str,
    stem: Path,
) -> tuple[Path, Path]:
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fig = new_figure()
    ax = fig.add_subplot()
    fitters = []
    high = risk > threshold
    for mask, name, color in ((~high, "low risk", "C0"), (high, "high risk", "C3")):
        if mask.any():
            kmf = KaplanMeierFitter(label=name).fit(time[mask], event[mask])
            kmf.plot_survival_function(ax=ax, ci_show=True, color=color, lw=1.4)
            fitters.append(kmf)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, frameon=False, loc="best")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        add_at_risk_counts(*fitters, ax=ax, fig=fig, rows_to_show=["At risk"], fontsize=6)
    fig.tight_layout()
    return save_figure(fig, stem)


def survival_statistics(
    sources: Sequence[Source],
    frames: Sequence[pd.DataFrame],
    out_dir: Path,
    *,
    time_label: str | None,
    status_label: str | None,
) -> Outcome:
    """``survival-stats_individual.csv`` and one KM plot per CSV."""
    outcome = Outcome()
    rows: list[dict[str, Any]] = []
    for src, df in zip(sources, frames, strict=True):
        t_col, s_col = survival_columns(df, src.path, time_label, status_label)
        risk, time, event, cut_off = survival_data(df, src.path, t_col, s_col)
        threshold = cut_off if cut_off is not None else float(np.median(risk))
        try:
            metrics = survival_metrics(risk, time, event, threshold)
        except (ValueError, ZeroDivisionError) as exc:
            raise StatisticsError(
                f"prediction CSV {src.path}: no comparable patient pairs in {s_col!r} ({exc}): "
                "the C-index needs at least one event"
            ) from None
        row = {
            "source": src.label,
            **metrics,
            "threshold_from": "cut_off column" if cut_off is not None else "median",
        }
        rows.append(row)
        title = f"{src.label}\nC-index {metrics['c_index']:.2f}, log-rank p {metrics['logrank_p']:.2g}"
        svg, png = _km_plot(
            risk, time, event, threshold, title, t_col, out_dir / "plots" / f"{src.slug}_km_curve"
        )
        outcome.files += [svg, png]
        outcome.plots.append(png)
    outcome.files.append(write_table(pd.DataFrame(rows), out_dir / "survival-stats_individual.csv"))
    mean, lo, hi = t_interval([r["c_index"] for r in rows], bounds=(0.0, 1.0))
    for row in rows:
        outcome.rows.append(json_row(_flat("file", row, row["c_index"], float("nan"), float("nan"))))
    if len(rows) > 1:
        total = {k: sum(r[k] for r in rows) for k in ("count", "events", "censored")}
        agg = {"source": f"all ({len(rows)} files, t-interval)", **total, "threshold_from": ""}
        outcome.rows.append(json_row(_flat("aggregate", agg, mean, lo, hi)))
    ci = f" [{lo:.2f}–{hi:.2f}], t-interval over {len(rows)} files" if np.isfinite(lo) else ""
    outcome.summary.append(f"- **C-index** {'mean ' if len(rows) > 1 else ''}{mean:.3f}{ci}")
    return outcome


def _flat(level: str, row: dict[str, Any], c_index: float, lo: float, hi: float) -> dict[str, Any]:
    """One metrics-table row with the same keys for files and the aggregate."""
    nan = float("nan")
    return {
        "level": level,
        "source": row["source"],
        "count": row["count"],
        "events": row["events"],
        "censored": row["censored"],
        "comparable_pairs": row.get("comparable_pairs", nan),
        "c_index": c_index,
        "c_index_lo": lo,
        "c_index_hi": hi,
        "logrank_p": row.get("logrank_p", nan),
        "threshold": row.get("threshold", nan),
        "threshold_from": row["threshold_from"],
    }
