"""Figures (ROC, PR, scatter, Kaplan–Meier) saved as SVG and PNG, atomically.

Figures are drawn on :class:`matplotlib.figure.Figure` with the Agg canvas directly, so no display
and no pyplot state are touched. Size 3.8 × 4.1 in (STAMP's), PNG at 200 dpi; SVGs carry no date
and fixed element ids, so re-running on the same data writes the same SVG bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stamp.fileio import atomic_path
from stamp.statistics.bootstrap import GRID

__all__ = [
    "FIGSIZE",
    "PNG_DPI",
    "Curve",
    "new_figure",
    "pr_figure",
    "roc_figure",
    "save_figure",
    "scatter_figure",
]

FIGSIZE = (3.8, 4.1)
PNG_DPI = 200


@dataclass
class Curve:
    """One curve: x, y, its legend label."""

    x: np.ndarray
    y: np.ndarray
    label: str


def new_figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    """A pyplot-free figure on the Agg canvas."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: Path) -> tuple[Path, Path]:
    """Write ``stem.svg`` and ``stem.png`` atomically; return (svg, png)."""
    svg, png = stem.with_name(stem.name + ".svg"), stem.with_name(stem.name + ".png")
    with matplotlib.rc_context({"svg.hashsalt": "stamp-statistics"}):
        with atomic_path(svg) as tmp:
            fig.savefig(tmp, format="svg", metadata={"Date": None})
        with atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=PNG_DPI)
    return svg, png


def _finish(fig: Figure, ax: Axes, title: str, xlabel: str, ylabel: str, legend: bool) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if legend:
        ax.legend(loc="lower right", fontsize=6, frameon=False)
    fig.tight_layout()


def roc_figure(curves: Sequence[Curve], band: tuple[np.ndarray, np.ndarray] | None, title: str) -> Figure:
    """ROC curve(s) with the chance diagonal and, for one curve, its bootstrap 95 % band."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    if band is not None and np.isfinite(band[0]).any():
        ax.fill_between(GRID, band[0], band[1], color="C0", alpha=0.25, lw=0, label="95 % CI")
    for i, curve in enumerate(curves):
        ax.plot(curve.x, curve.y, lw=1.4, color=f"C{i % 10}", label=curve.label)
    _finish(
        fig,
        ax,
        title,
        "False positive rate",
        "True positive rate",
        legend=len(curves) > 1 or band is not None,
    )
    return fig


def pr_figure(
    curves: Sequence[Curve], band: tuple[np.ndarray, np.ndarray] | None, baseline: float, title: str
) -> Figure:
    """Precision–recall curve(s) (x = recall, scikit-learn order) with the prevalence baseline and band."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.axhline(baseline, ls="--", lw=0.8, color="grey", label=f"prevalence {baseline:.2f}")
    if band is not None and np.isfinite(band[0]).any():
        ax.fill_between(GRID, band[0], band[1], color="C0", alpha=0.25, lw=0, label="95 % CI")
    for i, curve in enumerate(curves):
        ax.step(curve.x, curve.y, where="post", lw=1.4, color=f"C{i % 10}", label=curve.label)
    _finish(fig, ax, title, "Recall", "Precision", legend=True)
    return fig


def scatter_figure(
    y: np.ndarray, pred: np.ndarray, slope: float, intercept: float, stderr: float, title: str, xlabel: str
) -> Figure:
    """Ground truth vs prediction with the least-squares line and a ± slope-stderr band."""
    fig = new_figure()
    ax = fig.add_subplot()
    ax.scatter(y, pred, s=10, alpha=0.7, color="C0", edgecolors="none")
    xs = np.linspace(float(np.min(y)), float(np.max(y)), 100)
    ax.plot(xs, intercept + slope * xs, color="C3", lw=1.4, label=f"fit y = {slope:.2f}x + {intercept:.2f}")
    if np.isfinite(stderr):
        centre = float(np.mean(y))
        lo = intercept + slope * xs - stderr * np.abs(xs - centre)
        hi = intercept + slope * xs + stderr * np.abs(xs - centre)
        ax.fill_between(xs, lo, hi, color="C3", alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prediction")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=6, frameon=False)
    fig.tight_layout()
    return fig
