"""Synthetic whole-slide images with a planted biomarker: the test data of every stage.

:func:`write_slide` writes one pyramidal, JPEG-tiled TIFF that OpenSlide opens
as vendor ``aperio`` with ``openslide.mpp-x`` (or a generic tiled TIFF, with or
without mpp), with its ground truth (tissue and planted-region GeoJSON + PNG
masks) beside it. :func:`write_cohort` writes a cohort: ``slides/``,
``clini.csv``, ``slide.csv``, ``truth.json`` and, optionally, ``extras/`` with
an mpp-less and broken files. Everything is a pure function of the seed (same
seed, same bytes); rendering is streamed tile by tile, so a 20,000² px slide
needs well under 1 GiB.

Modules: :mod:`stamp.synthetic_slide` (one slide), :mod:`stamp.synthetic_cohort`
(cohort tables and variants), :mod:`stamp.synthetic_masks` (geometry),
:mod:`stamp.synthetic_texture` (H&E texture atlases), :mod:`stamp.synthetic_paint`
(tiles) and :mod:`stamp.synthetic_tiff` (pyramid + TIFF layout).
"""

from stamp.synthetic_cohort import (
    DEFAULT_SIZE,
    CohortInfo,
    SlideRecord,
    load_cohort,
    synth_command,
    write_cohort,
)
from stamp.synthetic_slide import SlideSpec, SlideTruth, write_slide

__all__ = [
    "DEFAULT_SIZE",
    "CohortInfo",
    "SlideRecord",
    "SlideSpec",
    "SlideTruth",
    "load_cohort",
    "synth_command",
    "write_cohort",
    "write_slide",
]
