"""Classification statistics (single and multi-target), one-vs-rest per class.

Per CSV and class (classes with at least one patient in that CSV): ``count`` (patients of the
class), ``n_patients`` (patients with ground truth), ``roc_auc_score``, ``average_precision_score``
(class probability as score), ``f1_score`` (argmax prediction == class), ``p_value`` (Student's
``scipy.stats.ttest_ind`` of the class probability of the class's patients vs the others), all
from scikit-learn / SciPy. With ONE CSV the individual table also has bootstrap 95 % CI columns
``<metric>_lo`` / ``<metric>_hi`` (``n_bootstrap`` patient resamples, seeded, one-class draws
skipped). The aggregated table has per class ``<metric>_mean``, ``<metric>_ci_low``,
``<metric>_ci_high``: a Student-t interval over the CSVs, or with one CSV the bootstrap interval
(column ``ci_method`` says which).

Plots ``roc-curve_<gt>=<class>`` / ``pr-curve_<gt>=<class>`` (SVG + PNG): one CSV → its curve and
the bootstrap band, AUROC/AP with CI in the title; several → one curve per CSV sorted by AUROC and
the mean with its t-interval in the title. PR baseline = prevalence. Which classes are plotted:
``true_class`` when given; otherwise (STAMP requires it for one target) every class, and for
multi-target every class of each target (or ``true_class`` where the target has it).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from stamp.escaping import markdown_cell
from stamp.statistics.bootstrap import ClassBootstrap, bootstrap_class, resample_indices, t_interval
from stamp.statistics.outcome import Outcome
from stamp.statistics.plots import Curve, pr_figure, roc_figure, save_figure
from stamp.statistics.tables import (
    ClassData,
    Source,
    StatisticsError,
    classification_data,
    json_row,
    safe_name,
    write_table,
)

__all__ = ["METRICS", "auroc_ci", "class_metrics", "classification_statistics"]

METRICS = ("roc_auc_score", "average_precision_score", "f1_score")


def auroc_ci(
    rows: Sequence[Mapping[str, Any]], positive: str, level: str = "aggregate"
) -> tuple[float, float, float]:
    """AUROC of class ``positive`` and its 95 % CI, from a statistics run's metric rows
    (:attr:`stamp.statistics.StatisticsResult.rows`) of ``level``: ``"aggregate"`` (mean over the
    prediction files with its Student-t interval) or ``"baseline"`` (the mean-pool baseline's)."""
    for row in rows:
        if row.get("level") == level and row.get("class") == positive:
            return row["roc_auc_score"], row["roc_auc_score_lo"], row["roc_auc_score_hi"]
    raise ValueError(f"statistics produced no {level} AUROC row for class {positive}")


def class_metrics(data: ClassData, c: int) -> dict[str, Any]:
    """One-vs-rest metrics of class index ``c`` (scikit-learn / SciPy, exactly)."""
    y = data.y == c
    score = data.probs[:, c]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(stats.ttest_ind(score[y], score[~y]).pvalue)
    return {
        "count": int(y.sum()),
        "n_patients": len(y),
        "roc_auc_score": float(roc_auc_score(y, score)),
        "average_precision_score": float(average_precision_score(y, score)),
        "f1_score": float(f1_score(y, data.argmax == c, zero_division=0.0)),
        "p_value": p_value,
    }


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"


def _ci_text(lo: float, hi: float) -> str:
    return "" if not (np.isfinite(lo) and np.isfinite(hi)) else f" [{lo:.2f}–{hi:.2f}]"


def _plot_classes(target: str, classes: list[str], true_class: str | None, multi: bool) -> list[str]:
    if true_class is None:
        return classes
    if true_class in classes:
        return [true_class]
    if multi:
        return classes
    raise StatisticsError(
        f"statistics.true_class {true_class!r} is not a class of {target!r} (classes: {', '.join(classes)})"
    )


def _target_statistics(
    target: str,
    datas: list[tuple[Source, ClassData]],
    out_dir: Path,
    true_class: str | None,
    multi: bool,
    n_bootstrap: int,
    seed: int,
    used: set[str],
) -> tuple[Outcome, pd.DataFrame]:
    outcome = Outcome()
    single = len(datas) == 1
    classes: list[str] = []
    for _, data in datas:
        classes += [c for c in data.classes if c not in classes]
    boots: dict[str, ClassBootstrap] = {}
    individual: list[dict[str, Any]] = []
    for source, data in datas:
        idx = resample_indices(len(data.y), n_bootstrap, seed) if single else None
        for c, cls in enumerate(data.classes):
            if not (data.y == c).any():
                continue
            row: dict[str, Any] = {"source": source.label, "class": cls, **class_metrics(data, c)}
            if idx is not None:
                boot = bootstrap_class(data.y == c, data.probs[:, c], data.argmax == c, idx)
                boots[cls] = boot
                for metric in METRICS:
                    row[f"{metric}_lo"], row[f"{metric}_hi"] = boot.ci(metric)
            individual.append(row)
    ind = pd.DataFrame(individual)
    if single:
        ordered = ["source", "class", "count", "n_patients"]
        for metric in METRICS:
            ordered += [metric, f"{metric}_lo", f"{metric}_hi"]
        ind = ind[[*ordered, "p_value"]]
    outcome.files.append(write_table(ind, out_dir / f"{safe_name(target)}_categorical-stats_individual.csv"))

    aggregated: list[dict[str, Any]] = []
    for cls in classes:
        sub = ind[ind["class"] == cls]
        if sub.empty:
            continue
        agg: dict[str, Any] = {
            "class": cls,
            "count": int(sub["count"].sum()),
            "n_sources": len(sub),
            "ci_method": "bootstrap" if single else "t-interval",
        }
        for metric in METRICS:
            if single:
                mean, lo, hi = float(sub[metric].iloc[0]), *boots[cls].ci(metric)
            else:
                mean, lo, hi = t_interval(sub[metric].to_numpy(), bounds=(0.0, 1.0))
            agg[f"{metric}_mean"], agg[f"{metric}_ci_low"], agg[f"{metric}_ci_high"] = mean, lo, hi
        aggregated.append(agg)
    agg_df = pd.DataFrame(aggregated)
    outcome.files.append(
        write_table(agg_df, out_dir / f"{safe_name(target)}_categorical-stats_aggregated.csv")
    )

    for row in individual:
        outcome.rows.append(json_row({"level": "file", "target": target, **_with_ci_keys(row)}))
    for agg in aggregated:
        outcome.rows.append(json_row(_aggregate_row(target, agg)))

    for cls in _plot_classes(target, classes, true_class, multi):
        _plot_class(target, cls, datas, boots.get(cls), agg_df, out_dir, used, outcome)
    return outcome, agg_df


def _with_ci_keys(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "source": row["source"],
        "class": row["class"],
        "count": row["count"],
        "n_patients": row["n_patients"],
    }
    for metric in METRICS:
        out[metric] = row[metric]
        out[f"{metric}_lo"] = row.get(f"{metric}_lo", float("nan"))
        out[f"{metric}_hi"] = row.get(f"{metric}_hi", float("nan"))
    out["p_value"] = row["p_value"]
    return out


def _aggregate_row(target: str, agg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "level": "aggregate",
        "target": target,
        "source": f"all ({agg['n_sources']} files, {agg['ci_method']})",
        "class": agg["class"],
        "count": agg["count"],
        "n_patients": float("nan"),
    }
    for metric in METRICS:
        out[metric] = agg[f"{metric}_mean"]
        out[f"{metric}_lo"], out[f"{metric}_hi"] = agg[f"{metric}_ci_low"], agg[f"{metric}_ci_high"]
    out["p_value"] = float("nan")
    return out


def _plot_class(
    target: str,
    cls: str,
    datas: list[tuple[Source, ClassData]],
    boot: ClassBootstrap | None,
    agg_df: pd.DataFrame,
    out_dir: Path,
    used: set[str],
    outcome: Outcome,
) -> None:
    roc_curves: list[tuple[float, Curve]] = []
    pr_curves: list[tuple[float, Curve]] = []
    n_pos = n_all = 0
    for source, data in datas:
        if cls not in data.classes:
            continue
        c = data.classes.index(cls)
        y, score = data.y == c, data.probs[:, c]
        if not y.any():
            continue
        n_pos, n_all = n_pos + int(y.sum()), n_all + len(y)
        auc, ap = roc_auc_score(y, score), average_precision_score(y, score)
        fpr, tpr, _ = roc_curve(y, score)
        precision, recall, _ = precision_recall_curve(y, score)
        name = "" if len(datas) == 1 else f"{source.label} "
        roc_curves.append((auc, Curve(fpr, tpr, f"{name}AUROC {auc:.2f}")))
        pr_curves.append((ap, Curve(recall, precision, f"{name}AP {ap:.2f}")))
    if not roc_curves:
        return
    row = agg_df[agg_df["class"] == cls].iloc[0]
    heading = f"{target} = {cls}"
    kind = "" if len(roc_curves) == 1 else "mean "
    roc_title = f"{heading}\n{kind}AUROC {_fmt(row['roc_auc_score_mean'], 2)}" + _ci_text(
        row["roc_auc_score_ci_low"], row["roc_auc_score_ci_high"]
    )
    pr_title = f"{heading}\n{kind}AP {_fmt(row['average_precision_score_mean'], 2)}" + _ci_text(
        row["average_precision_score_ci_low"], row["average_precision_score_ci_high"]
    )
    rocs = [c for _, c in sorted(roc_curves, key=lambda item: -item[0])]
    prs = [c for _, c in sorted(pr_curves, key=lambda item: -item[0])]
    roc_band, pr_band = (
        (boot.roc_band, boot.pr_band) if len(datas) == 1 and boot is not None else (None, None)
    )
    slug = _unique(f"{safe_name(target)}={safe_name(cls)}", used)
    fig = roc_figure(rocs, roc_band, roc_title)
    svg, png = save_figure(fig, out_dir / f"roc-curve_{slug}")
    outcome.files += [svg, png]
    outcome.plots.append(png)
    fig = pr_figure(prs, pr_band, n_pos / n_all, pr_title)
    svg, png = save_figure(fig, out_dir / f"pr-curve_{slug}")
    outcome.files += [svg, png]
    outcome.plots.append(png)


def _unique(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate.lower() in used:
        k += 1
        candidate = f"{name}-{k}"
    used.add(candidate.lower())
    return candidate


def classification_statistics(
    sources: Sequence[Source],
    frames: Sequence[pd.DataFrame],
    targets: Sequence[str],
    out_dir: Path,
    *,
    true_class: str | None,
    n_bootstrap: int,
    seed: int,
) -> Outcome:
    """Tables and plots for every target in ``targets`` over the CSVs (``frames`` read from ``sources``)."""
    multi = len(targets) > 1
    outcome = Outcome()
    used: set[str] = set()
    summaries: list[pd.DataFrame] = []
    for target in targets:
        datas = [
            (src, classification_data(df, src.path, target, targets))
            for src, df in zip(sources, frames, strict=True)
        ]
        part, agg_df = _target_statistics(target, datas, out_dir, true_class, multi, n_bootstrap, seed, used)
        outcome.files += part.files
        outcome.plots += part.plots
        outcome.rows += part.rows
        summaries.append(agg_df.assign(target=target))
        for cls in _plot_classes(target, list(agg_df["class"]), true_class, multi):
            row = agg_df[agg_df["class"] == cls].iloc[0]
            outcome.summary.append(
                f"- **{markdown_cell(target)} = {markdown_cell(cls)}**: AUROC {_fmt(row['roc_auc_score_mean'])}"
                f"{_ci_text(row['roc_auc_score_ci_low'], row['roc_auc_score_ci_high'])}, "
                f"AP {_fmt(row['average_precision_score_mean'])}, F1 {_fmt(row['f1_score_mean'])} "
                f"({row['count']} positive, {row['ci_method']} over {row['n_sources']} file(s))"
            )
    if multi:
        summary = pd.concat(summaries, ignore_index=True)
        summary = summary[["target", *[c for c in summary.columns if c != "target"]]]
        outcome.files.append(write_table(summary, out_dir / "multitarget_categorical-stats_summary.csv"))
    return outcome
