"""``stamp heatmaps``: tile relevance and attention maps, overlays, top/bottom tiles and GeoJSON.

Use (one call per slide; slides are independent, so a flow can fan them out as tasks)::

    plan = plan_heatmaps(cfg.heatmaps)           # jobs + slides skipped (no features, missing)
    for job in plan:
        result = render_slide(job, cfg.heatmaps.checkpoint_path, opacity=..., topk=..., bottomk=...,
                              device=..., default_slide_mpp=...)   # HeatmapError: one line, this slide

Modules: :mod:`.jobs` (planning), :mod:`.relevance` (gradient × input, single-tile predictions,
attention), :mod:`.maps` (tile grid → images), :mod:`.figures` (annotated plots),
:mod:`.outputs` (top tiles, GeoJSON, arrays), :mod:`.render` (one slide), :mod:`.localisation`
(score against synthetic ground truth).
"""

from stamp.heatmaps.jobs import HeatmapError, HeatmapJob, HeatmapPlan, SkippedSlide, plan_heatmaps
from stamp.heatmaps.localisation import localisation_score, top_tile_fractions
from stamp.heatmaps.outputs import TopTile
from stamp.heatmaps.render import SlideHeatmaps, render_slide

__all__ = [
    "HeatmapError",
    "HeatmapJob",
    "HeatmapPlan",
    "SkippedSlide",
    "SlideHeatmaps",
    "TopTile",
    "localisation_score",
    "plan_heatmaps",
    "render_slide",
    "top_tile_fractions",
]
