"""Regression statistics: R², Pearson r and p, MAE, RMSE per CSV, t-interval over CSVs, scatter plots.

Rows with a missing ground truth or prediction are dropped. With ONE CSV the individual table
also has bootstrap 95 % CI columns ``<metric>_lo`` / ``<metric>_hi`` for ``r2_score``,
``pearson_r``, ``mae`` and ``rmse`` (draws with a constant truth or prediction skipped), and the
aggregated table uses that interval (``ci_method`` says which interval a row holds).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from stamp.escaping import markdown_cell
from stamp.statistics.bootstrap import bootstrap_regression, percentile_ci, resample_indices, t_interval
from stamp.statistics.outcome import Outcome
from stamp.statistics.plots import save_figure, scatter_figure
from stamp.statistics.tables import (
    Source,
    StatisticsError,
    json_row,
    numeric_column,
    require_columns,
    safe_name,
    write_table,
)

__all__ = ["REGRESSION_METRICS", "regression_metrics", "regression_statistics", "regression_target"]

REGRESSION_METRICS = ("r2_score", "pearson_r", "pearson_p", "mae", "rmse")
#: Ranges of the metrics a t-interval is clipped to.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "r2_score": (-np.inf, 1.0),
    "pearson_r": (-1.0, 1.0),
    "pearson_p": (0.0, 1.0),
    "mae": (0.0, np.inf),
    "rmse": (0.0, np.inf),
}
_BOOTSTRAPPED = ("r2_score", "pearson_r", "mae", "rmse")


def regression_target(df: pd.DataFrame, path: Path, ground_truth_label: str | list[str] | None) -> str:
    """The ground-truth column: the configured one, else the column just before ``pred``."""
    label: str | None
    if isinstance(ground_truth_label, list):
        if len(ground_truth_label) != 1:
            raise StatisticsError("statistics.ground_truth_label: regression takes one column, not a list")
        label = ground_truth_label[0]
    else:
        label = ground_truth_label
    if label is None:
        cols = [str(c) for c in df.columns]
        if "pred" not in cols or cols.index("pred") == 0:
            raise StatisticsError(
                f"prediction CSV {path} has no 'pred' column: set statistics.ground_truth_label"
            )
        label = cols[cols.index("pred") - 1]
    require_columns(df, path, [label], "ground_truth_label")
    require_columns(df, path, ["pred"], "task (this CSV has no regression 'pred' column)")
    return label


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """``r2_score, pearson_r, pearson_p, mae, rmse, count`` (scikit-learn / SciPy, exactly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, p = stats.pearsonr(y, pred)
    return {
        "count": len(y),
        "r2_score": float(r2_score(y, pred)),
        "pearson_r": float(r),
        "pearson_p": float(p),
        "mae": float(mean_absolute_error(y, pred)),
        "rmse": float(np.sqrt(mean_squared_error(y, pred))),
    }


def _pairs(df: pd.DataFrame, path: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    y, pred = numeric_column(df, target, path), numeric_column(df, "pred", path)
    keep = np.isfinite(y) & np.isfinite(pred)
    if keep.sum() < 2:
        raise StatisticsError(
            f"prediction CSV {path} has {int(keep.sum())} patient(s) with both {target!r} and 'pred': "
            "regression statistics need at least two labelled patients"
        )
    return y[keep], pred[keep]


def regression_statistics(
    sources: Sequence[Source],
    frames: Sequence[pd.DataFrame],
    target: str,
    out_dir: Path,
    *,
    n_bootstrap: int,
    seed: int,
) -> Outcome:
    """Individual / aggregated tables and one scatter plot per CSV (``plots/<label>_scatter``)."""
    outcome = Outcome()
    single = len(sources) == 1
    rows: list[dict[str, Any]] = []
    boot: dict[str, np.ndarray] = {}
    for src, df in zip(sources, frames, strict=True):
        y, pred = _pairs(df, src.path, target)
        row: dict[str, Any] = {"source": src.label, **regression_metrics(y, pred)}
        if single:
            boot = bootstrap_regression(y, pred, resample_indices(len(y), n_bootstrap, seed))
            for metric in _BOOTSTRAPPED:
                row[f"{metric}_lo"], row[f"{metric}_hi"] = percentile_ci(boot[metric])
        rows.append(row)
        fit = stats.linregress(y, pred) if np.ptp(y) > 0 else None
        title = f"{src.label}\nR² {row['r2_score']:.2f}, r {row['pearson_r']:.2f} (p {row['pearson_p']:.2g})"
        fig = scatter_figure(
            y,
            pred,
            fit.slope if fit else 0.0,
            fit.intercept if fit else float(np.mean(pred)),
            fit.stderr if fit else float("nan"),
            title,
            target,
        )
        svg, png = save_figure(fig, out_dir / "plots" / f"{src.slug}_scatter")
        outcome.files += [svg, png]
        outcome.plots.append(png)
    ind = pd.DataFrame(rows)
    if single:  # each metric followed by its bootstrap interval
        ordered = ["source", "count"]
        for metric in REGRESSION_METRICS:
            ordered += [metric, *((f"{metric}_lo", f"{metric}_hi") if metric in _BOOTSTRAPPED else ())]
        ind = ind[ordered]
    outcome.files.append(write_table(ind, out_dir / f"{safe_name(target)}_regression-stats_individual.csv"))

    agg: dict[str, Any] = {
        "count": int(ind["count"].sum()),
        "n_sources": len(ind),
        "ci_method": "bootstrap" if single else "t-interval",
    }
    for metric in REGRESSION_METRICS:
        if single:
            lo, hi = (row[f"{metric}_lo"], row[f"{metric}_hi"]) if metric in boot else (np.nan, np.nan)
            mean = float(ind[metric].iloc[0])
        else:
            mean, lo, hi = t_interval(ind[metric].to_numpy(), bounds=METRIC_BOUNDS.get(metric))
        agg[f"{metric}_mean"], agg[f"{metric}_ci_low"], agg[f"{metric}_ci_high"] = mean, lo, hi
    outcome.files.append(
        write_table(pd.DataFrame([agg]), out_dir / f"{safe_name(target)}_regression-stats_aggregated.csv")
    )

    for row in rows:
        flat = {"level": "file", "target": target, "source": row["source"], "count": row["count"]}
        for metric in REGRESSION_METRICS:
            flat[metric] = row[metric]
            flat[f"{metric}_lo"], flat[f"{metric}_hi"] = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
        outcome.rows.append(json_row(flat))
    flat = {"level": "aggregate", "target": target, "source": f"all ({len(ind)} files, {agg['ci_method']})"}
    flat["count"] = agg["count"]
    for metric in REGRESSION_METRICS:
        flat[metric] = agg[f"{metric}_mean"]
        flat[f"{metric}_lo"], flat[f"{metric}_hi"] = agg[f"{metric}_ci_low"], agg[f"{metric}_ci_high"]
    outcome.rows.append(json_row(flat))
    ci = ""
    if np.isfinite(agg["r2_score_ci_low"]):
        ci = f" [{agg['r2_score_ci_low']:.2f}–{agg['r2_score_ci_high']:.2f}]"
    outcome.summary.append(
        f"- **{markdown_cell(target)}**: R² {agg['r2_score_mean']:.3f}{ci}, Pearson r {agg['pearson_r_mean']:.3f}, "
        f"MAE {agg['mae_mean']:.3g}, RMSE {agg['rmse_mean']:.3g} ({agg['count']} patients, "
        f"{agg['ci_method']} over {agg['n_sources']} file(s))"
    )
    return outcome
