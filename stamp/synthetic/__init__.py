"""Synthetic whole-slide images with a planted biomarker: the test data of every stage.

:func:`write_slide` writes one pyramidal, JPEG-tiled TIFF that OpenSlide opens
as vendor ``aperio`` with ``openslide.mpp-x`` (or a generic tiled TIFF, with or
without mpp), with its ground truth (tissue and planted-region GeoJSON + PNG
masks) beside it. :func:`write_cohort` writes a cohort: ``slides/``,
``clini.csv``, ``slide.csv``, ``truth.json`` and, optionally, ``extras/`` with
an mpp-less and broken files. Everything is a pure function of the seed (same
seed, same bytes); rendering is streamed tile by tile, so a 20,000² px slide
needs well under 1 GiB.

Modules: :mod:`~stamp.synthetic.cohort` (cohort tables, truth manifest, provenance),
:mod:`~stamp.synthetic.extras` (the mpp-less and broken files), :mod:`~stamp.synthetic.slide`
(one slide and its truth), :mod:`~stamp.synthetic.regions` (tissue / planted geometry),
:mod:`~stamp.synthetic.texture` (H&E texture atlases), :mod:`~stamp.synthetic.paint` (tiles)
and :mod:`~stamp.synthetic.tiff` (pyramid + TIFF layout).
"""

from stamp.synthetic.cohort import (
    DEFAULT_SIZE,
    CohortInfo,
    SlideRecord,
    check_cohort,
    generator_code_hash,
    load_cohort_truth,
    synth_command,
    write_cohort,
)
from stamp.synthetic.slide import SlideSpec, SlideTruth, write_slide

__all__ = [
    "DEFAULT_SIZE",
    "CohortInfo",
    "SlideRecord",
    "SlideSpec",
    "SlideTruth",
    "check_cohort",
    "generator_code_hash",
    "load_cohort_truth",
    "synth_command",
    "write_cohort",
    "write_slide",
]
