"""The two annotated figures per slide (``plots/``): the overview panel and a titled overlay.

Drawn with matplotlib's object API (no ``pyplot`` state), so slides can render in parallel threads.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Colourbar", "Panel", "overlay_figure", "overview_figure"]


@dataclass(frozen=True)
class Colourbar:
    """A colour scale to draw next to a panel."""

    cmap: str
    vmin: float
    vmax: float
    label: str = ""
    centre: float | None = None


@dataclass(frozen=True)
class Panel:
    """One image of a figure with its title and (optional) colour scale."""

    title: str
    image: np.ndarray  # RGB or RGBA uint8
    colourbar: Colourbar | None = None


def _norm(bar: Colourbar):  # noqa: ANN202
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if bar.centre is not None and bar.vmin < bar.centre < bar.vmax:
        return TwoSlopeNorm(vcenter=bar.centre, vmin=bar.vmin, vmax=bar.vmax)
    return Normalize(vmin=bar.vmin, vmax=bar.vmax if bar.vmax > bar.vmin else bar.vmin + 1)


def _draw(fig, ax, panel: Panel) -> None:  # noqa: ANN001
    from matplotlib.cm import ScalarMappable

    ax.imshow(panel.image, interpolation="nearest")
    ax.set_title(panel.title, fontsize=9)
    ax.axis("off")
    if panel.colourbar is not None:
        bar = panel.colourbar
        mappable = ScalarMappable(norm=_norm(bar), cmap=bar.cmap)
        cb = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label(bar.label, fontsize=8)
        cb.ax.tick_params(labelsize=7)


def _save(fig) -> bytes:  # noqa: ANN001
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor="white")
    return buf.getvalue()


def overview_figure(title: str, panels: list[Panel]) -> bytes:
    """PNG of the panels in a grid (at most 3 per row) under ``title``."""
    from matplotlib.figure import Figure

    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    h, w = panels[0].image.shape[:2] if panels else (1, 1)
    cell_w = 4.0
    cell_h = max(1.5, min(8.0, cell_w * h / max(w, 1))) + 0.5
    fig = Figure(figsize=(cell_w * cols + 1.0 * cols, cell_h * rows + 0.6), layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(panels):
            _draw(fig, ax, panels[i])
        else:
            ax.axis("off")
    return _save(fig)


def overlay_figure(panel: Panel) -> bytes:
    """PNG of one overlay with its title and colour scale."""
    from matplotlib.figure import Figure

    h, w = panel.image.shape[:2]
    fig_w = 8.0
    fig = Figure(
        figsize=(fig_w + 1.2, max(2.0, min(12.0, fig_w * h / max(w, 1))) + 0.6), layout="constrained"
    )
    _draw(fig, fig.subplots(), panel)
    return _save(fig)
