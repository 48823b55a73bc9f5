"""Helpers for the ``test_slides_*`` modules: small TIFF writers and a STAMP reference tiler.

No tests live here. The writers follow the verified recipes (env-facts §2): Aperio needs
``metadata=None`` and a description starting with ``Aperio``; generic pyramids need
``subfiletype=1``; OME/SubIFD pyramids are invisible to OpenSlide.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import tifffile

_JPEG = {"compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}


def make_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """White background, a pink ellipse with purple dots: enough structure to compare pixels."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 250, np.uint8)
    cv2.ellipse(img, (width // 2, height // 2), (width // 3, height // 3), 0, 0, 360, (220, 140, 190), -1)
    for _ in range(max(20, width * height // 4000)):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        cv2.circle(img, (x, y), int(rng.integers(2, 6)), (90, 40, 130), -1)
    return img


def pyramid(img: np.ndarray, downsamples: tuple[int, ...]) -> list[np.ndarray]:
    h, w = img.shape[:2]
    return [
        img if d == 1 else cv2.resize(img, (max(1, w // d), max(1, h // d)), interpolation=cv2.INTER_AREA)
        for d in downsamples
    ]


def write_aperio(
    path: Path, img: np.ndarray, mpp: float | None = 0.25, downsamples=(1, 4, 16), tile=256
) -> Path:
    h, w = img.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=90|AppMag = 40"
    )
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid(img, downsamples)):
            kw = {"description": desc} if i == 0 else {}
            tw.write(level, tile=(tile, tile), metadata=None, **_JPEG, **kw)
    return path


def write_generic(
    path: Path, img: np.ndarray, mpp: float | None = None, downsamples=(1, 4), description=None
) -> Path:
    """Generic tiled TIFF pyramid (separate pages, subfiletype=1), resolution tags iff ``mpp``."""
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid(img, downsamples)):
            kw = dict(res) if i == 0 else {"subfiletype": 1}
            if i == 0 and description is not None:
                kw["description"] = description
            tw.write(level, tile=(256, 256), metadata=None, **_JPEG, **kw)
    return path


def write_ome_subifd(
    path: Path, img: np.ndarray, mpp: float = 0.5, unit: str = "µm", downsamples=(1, 4)
) -> Path:
    """OME-TIFF with a SubIFD pyramid (OpenSlide sees one level) and PhysicalSizeX in the OME-XML."""
    levels = pyramid(img, downsamples)
    meta = {
        "axes": "YXS",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": unit,
    }
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), metadata=meta, **_JPEG)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, tile=(256, 256), **_JPEG)
    return path


def write_stripped(
    path: Path, img: np.ndarray, description: str | None = None, mpp: float | None = None
) -> Path:
    """Single-level, strip-organised (untiled) zlib TIFF: OpenSlide refuses it."""
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        rowsperstrip=64,
        compression="zlib",
        description=description,
        metadata=None,
        **res,
    )
    return path


# --------------------------------------------------------------------------- STAMP reference


def stamp_reference_tiles(
    slide_path: Path,
    mpp: float,
    tile_size_um: float,
    tile_size_px: int,
    brightness_cutoff: int | None,
    canny_cutoff: float | None,
) -> dict[tuple[float, float], bool]:
    """A straightforward re-statement of STAMP 2.5's tiling rule (level-0 reads, PIL resampling).

    Returns ``{(x_um, y_um): kept}`` for every tile of every supertile that passed the brightness
    test (``kept`` = also passed Canny). Written from the documented behaviour, for comparison only.
    """
    import openslide

    slide = openslide.OpenSlide(str(slide_path))
    try:
        n = max(int((1024 * mpp) // tile_size_um), 1)
        tile_px0 = math.ceil(tile_size_um / mpp)
        st_px0 = tile_px0 * n
        w, h = slide.dimensions
        grid = (math.ceil(w / st_px0), math.ceil(h / st_px0))
        thumb = slide.get_thumbnail((grid[0] * 2, grid[1] * 2)).resize(grid).convert("L")
        gray = np.asarray(thumb)
        out: dict[tuple[float, float], bool] = {}
        for sy in range(0, h, st_px0):
            for sx in range(0, w, st_px0):
                if brightness_cutoff is not None and not gray[sy // st_px0, sx // st_px0] < brightness_cutoff:
                    continue
                region = slide.read_region((sx, sy), 0, (st_px0, st_px0))
                region = region.resize((tile_size_px * n, tile_size_px * n)).convert("RGB")
                for j in range(n):
                    for i in range(n):
                        tile = region.crop(
                            (
                                i * tile_size_px,
                                j * tile_size_px,
                                (i + 1) * tile_size_px,
                                (j + 1) * tile_size_px,
                            )
                        )
                        edges = cv2.Canny(np.asarray(tile.convert("L")), 40, 100)
                        keep = canny_cutoff is None or edges.mean() / 255 >= canny_cutoff
                        out[(sx * mpp + i * tile_size_um, sy * mpp + j * tile_size_um)] = bool(keep)
        return out
    finally:
        slide.close()
