"""Whole-slide images: discovery, readers, MPP, tissue detection, tiling and QC outputs.

Pure stage logic (no Prefect, no torch). The per-slide pipeline uses it as::

    reader = open_slide(path, reader="auto")            # SlideOpenError on a bad file
    mpp, source = resolve_mpp(reader, default_slide_mpp)  # MPPError without an MPP
    plan = plan_tiles(reader, mpp, params)               # grid, read level, tissue decision
    batches = iter_tile_batches(reader, plan, params)    # TileBatch(tiles, coords_um) ...
    ... batches.stats                                    # TilingStats once iterated

Every error a slide can raise here derives from :class:`SlideError` and carries a
one-line ``reason`` meant for the user.
"""

from stamp.slides.discovery import SLIDE_EXTENSIONS, find_slides
from stamp.slides.mpp import MPPError, resolve_mpp
from stamp.slides.reader_base import SlideError, SlideOpenError, SlideReader, SlideReadError
from stamp.slides.readers import READER_NAMES, open_slide
from stamp.slides.tile_reading import TileBatch, TileBatchIterator, TilingStats, iter_tile_batches
from stamp.slides.tiling import TilePlan, TilingParams, plan_tiles

__all__ = [
    "READER_NAMES",
    "SLIDE_EXTENSIONS",
    "MPPError",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "SlideReader",
    "TileBatch",
    "TileBatchIterator",
    "TilePlan",
    "TilingParams",
    "TilingStats",
    "find_slides",
    "iter_tile_batches",
    "open_slide",
    "plan_tiles",
    "resolve_mpp",
]
