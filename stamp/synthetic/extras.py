"""The ``extras/`` of a synthetic cohort: an mpp-less slide, a blank one and broken files.

Each item exercises one failure path of the readers (see :data:`EXTRA_EXPECT`);
they live beside the cohort, never under ``slides/``.
"""

from __future__ import annotations

from pathlib import Path

import tifffile

from stamp.synthetic.slide import SlideSpec, SlideTruth, slide_seed, write_slide

EXTRA_EXPECT = {  # what a reader should see for each extra
    "generic_no_mpp": "opens as generic-tiff without openslide.mpp-x; needs default_slide_mpp",
    "truncated": "OpenSlideError on open or when reading level-0 tiles",
    "not_a_slide": "OpenSlideUnsupportedFormatError on open",
    "blank": "opens as aperio; no tissue",
    "corrupt_tiles": "opens as aperio; reading the middle third of level-0 tiles raises OpenSlideError",
}


def write_extras(folder: Path, seed: int, size: int) -> dict[str, SlideTruth | Path]:
    """Write the ``extras/`` files into ``folder``; name -> truth (slides) or path (broken files)."""
    small = min(size, 2048)
    out: dict[str, SlideTruth | Path] = {}
    out["generic_no_mpp"] = write_slide(
        folder / "generic_no_mpp.tif",
        SlideSpec(
            width=small,
            height=small,
            mpp=None,
            vendor="generic",
            seed=slide_seed(seed, 10_001),
            texture_seed=seed,
        ),
    )
    out["blank"] = write_slide(
        folder / "blank.svs",
        SlideSpec(
            width=small, height=small, mpp=0.5, blank=True, seed=slide_seed(seed, 10_002), texture_seed=seed
        ),
    )
    # a real slide cut in half: the first IFD survives, later IFDs and most tile data do not
    trunc = folder / "truncated.svs"
    write_slide(
        trunc,
        SlideSpec(width=small, height=small, mpp=0.5, seed=slide_seed(seed, 10_003), texture_seed=seed),
    )
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    for suffix in ("tissue.geojson", "biomarker.geojson", "tissue.png", "biomarker.png"):
        trunc.with_name(f"truncated.{suffix}").unlink()
    out["truncated"] = trunc
    corrupt = folder / "corrupt_tiles.svs"
    out["corrupt_tiles"] = write_slide(
        corrupt,
        SlideSpec(width=small, height=small, mpp=0.25, seed=slide_seed(seed, 10_004), texture_seed=seed),
    )
    _zero_level0_tiles(corrupt)
    bad = folder / "not_a_slide.svs"
    bad.write_bytes(b"This is not a whole-slide image; it only has a slide file suffix.\n" * 20)
    out["not_a_slide"] = bad
    return out


def _zero_level0_tiles(path: Path) -> None:
    """Overwrite the middle third of level 0's JPEG tiles with zero bytes (structure stays valid)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)  # type: ignore[union-attr]
    n = len(offsets)
    with open(path, "r+b") as fh:
        for i in range(n // 3, 2 * n // 3):
            fh.seek(offsets[i])
            fh.write(bytes(counts[i]))
