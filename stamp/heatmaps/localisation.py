"""How well heatmaps point at the truth: share of a slide's top tiles inside planted regions.

Used against the synthetic cohort (:mod:`stamp.synthetic`), whose generator knows where the
biomarker was planted: a top tile counts as inside when at least ``min_fraction`` (½) of its
level-0 area is planted (``SlideTruth.planted_fraction_at``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stamp.heatmaps.render import SlideHeatmaps

__all__ = ["localisation_score", "top_tile_fractions"]


class _Truth(Protocol):
    def planted_fraction_at(self, x: float, y: float, w: float, h: float) -> float: ...


def top_tile_fractions(
    result: SlideHeatmaps,
    truth: _Truth,
    k: int = 5,
    *,
    positive: str | None = None,
    by: str = "relevance",
    region: str = "tile",
) -> np.ndarray:
    """Planted fraction of each of the slide's ``k`` best tiles for class ``positive``.

    ``by``: ``"relevance"`` (the normalised gradient × input relevance, default) or ``"score"``
    (relevance × single-tile support, what the maps show). ``positive`` defaults to the slide's
    predicted class (regression/survival: the single output). ``region``: ``"tile"`` measures
    the whole tile, ``"centre"`` only a window of 1/8 of the tile side at its centre.
    """
    if region not in ("tile", "centre"):
        raise ValueError(f"region must be 'tile' or 'centre', not {region!r}")
    with np.load(result.arrays) as z:
        labels = [str(x) for x in z["labels"]]
        coords = z["coords_um"]
        relevance = z["relevance"]
        support = z["support"] if "support" in z.files else None
    label = positive or result.predicted or labels[0]
    if label not in labels:
        raise ValueError(f"{result.slide}: no output {label!r}; outputs are {', '.join(labels)}")
    c = labels.index(label)
    values = relevance[:, c]
    if by == "score" and support is not None:
        lo, hi = values.min(), values.max()
        values = support[:, c] * ((values - lo) / (hi - lo) if hi > lo else np.ones_like(values))
    elif by not in ("relevance", "score"):
        raise ValueError(f"by must be 'relevance' or 'score', not {by!r}")
    order = np.argsort(-values, kind="stable")[: max(0, int(k))]
    side = result.tile_size_um / result.mpp
    win = side / 8 if region == "centre" else side
    off = (side - win) / 2
    return np.array(
        [
            truth.planted_fraction_at(
                coords[i, 0] / result.mpp + off, coords[i, 1] / result.mpp + off, win, win
            )
            for i in order
        ]
    )


def localisation_score(
    results: SlideHeatmaps | Sequence[SlideHeatmaps],
    truth: _Truth | Sequence[_Truth] | Mapping[Any, _Truth],
    k: int = 5,
    *,
    positive: str | None = None,
    by: str = "relevance",
    min_fraction: float = 0.5,
    region: str = "tile",
) -> float:
    """Share of the top-``k`` tiles (class ``positive``) that lie inside the planted regions.

    One result and its truth, or several: ``truth`` then is a sequence aligned with ``results``
    or a mapping from slide path (or slide name, or file stem) to truth; the share is pooled
    over all their top tiles. A tile is inside when ≥ ``min_fraction`` of its area (``region="tile"``)
    or of the window at its centre (``region="centre"``: the tile's centre lies in a region) is planted.
    """
    if isinstance(results, SlideHeatmaps):
        pairs = [(results, truth)]
    else:
        results = list(results)
        if isinstance(truth, Mapping):
            pairs = [(r, _lookup(truth, r)) for r in results]
        else:
            truths = list(truth)  # type: ignore[arg-type]
            if len(truths) != len(results):
                raise ValueError(f"{len(results)} results but {len(truths)} truths")
            pairs = list(zip(results, truths, strict=True))
    inside = total = 0
    for r, t in pairs:
        fr = top_tile_fractions(r, t, k, positive=positive, by=by, region=region)  # type: ignore[arg-type]
        inside += int((fr >= min_fraction).sum())
        total += len(fr)
    if total == 0:
        raise ValueError("no top tiles to score")
    return inside / total


def _lookup(truth: Mapping[Any, _Truth], r: SlideHeatmaps) -> _Truth:
    for key in (r.slide_path, str(r.slide_path), r.slide, Path(r.slide_path).stem, Path(r.slide_path).name):
        if key in truth:
            return truth[key]
    raise KeyError(f"{r.slide_path}: no ground truth given for this slide")
