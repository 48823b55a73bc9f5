"""Write a pyramidal, JPEG-tiled TIFF (Aperio SVS or generic) from a tile painter, level by level.

Level 0 is streamed: each tile is painted, JPEG-encoded here (same codec call
and tags as tifffile's own ``compression='jpeg'`` for RGB: YCbCr 4:2:0) and
handed to tifffile as bytes, so identical background tiles are encoded once.
While streaming, every tile is area-downsampled 4x into a preallocated level-1
array; levels 2, 3, ... are derived from it. Peak memory is ~W*H*3/16 bytes
(level 1) plus the atlases, never the full level 0.

Aperio layout (what OpenSlide's ``aperio`` driver expects, see
reference/env-facts.md §2): ``metadata=None``; page 0 description starts with
``Aperio`` and carries ``AppMag`` and ``MPP``; then a stripped thumbnail page,
the tiled reduced levels as plain pages, and stripped label (subfiletype 1) and
macro (subfiletype 9) pages. Generic layout: no description, resolution tags
only when an mpp is given, reduced levels marked ``subfiletype=1``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import cv2
import imagecodecs
import numpy as np
import tifffile

from stamp.synthetic.paint import TilePainter

APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"
Vendor = Literal["aperio", "generic"]


def level_shapes(width: int, height: int, min_side: int = 128, min_levels: int = 3) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level: downsamples 1, 4, 16, ... while the short side is >= min_side."""
    shapes = [(width, height)]
    f = 4
    while len(shapes) < min_levels or min(width, height) // f >= min_side:
        shapes.append((max(1, width // f), max(1, height // f)))
        f *= 4
    return shapes


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    data = imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )
    return data if isinstance(data, bytes) else bytes(data)


def _reduce4(img: np.ndarray) -> np.ndarray:
    """Area-downsample by exactly 4 (edge-padding to a multiple of 4 first)."""
    h, w = img.shape[:2]
    ph, pw = -h % 4, -w % 4
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return cv2.resize(img, ((w + pw) // 4, (h + ph) // 4), interpolation=cv2.INTER_AREA)


def _label_image(name: str, size: int = 400) -> np.ndarray:
    """A slide label: white card, text and a barcode-like pattern derived from ``name``."""
    img = np.full((size, size, 3), 255, np.uint8)
    cv2.putText(img, "STAMP synthetic", (16, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 0, 0), 2, cv2.LINE_AA)
    cv2.putText(img, name[:22], (16, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 0, 0), 2, cv2.LINE_AA)
    bits = np.unpackbits(np.frombuffer(name.encode()[:24].ljust(24, b"\0"), np.uint8))
    for i, b in enumerate(bits):
        if b:
            x = 16 + i * (size - 32) // len(bits)
            img[200:360, x : x + max(1, (size - 32) // len(bits) - 1)] = 0
    return img


def _aperio_desc(w0: int, h0: int, tile: int, quality: int, mpp: float, name: str, w: int, h: int) -> str:
    mag = round(10.0 / mpp)
    size = f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
    if (w, h) != (w0, h0):
        size += f" -> {w}x{h}"
    return f"{APERIO_HEADER}{size} JPEG/RGB Q={quality}|AppMag = {mag}|MPP = {mpp:g}|ScanScope ID = STAMP-SYNTH|Filename = {name}"


def write_pyramid(
    path: Path,
    painter: TilePainter,
    width: int,
    height: int,
    vendor: Vendor,
    mpp: float | None,
    quality: int,
    name: str,
    associated: bool = True,
    stats: dict[str, float] | None = None,
) -> list[tuple[int, int]]:
    """Write the slide to ``path`` (no temp/rename here); returns the level shapes written.

    ``stats``, if given, receives phase timings in seconds (``paint``, ``encode``,
    ``downsample``, ``level0_total``, ``lower_levels``, ``associated``).
    """
    if vendor == "aperio" and mpp is None:
        raise ValueError("an Aperio slide needs an mpp (use vendor='generic' for a slide without one)")
    ap_mpp = mpp or 0.0  # only used for Aperio, where mpp is set
    t = painter.tile
    ntx, nty = -(-width // t), -(-height // t)
    q = t // 4
    level1 = np.empty((nty * q, ntx * q, 3), np.uint8)
    bg_bytes = [_jpeg(b, quality) for b in painter.background]
    bg_small = [_reduce4(b) for b in painter.background]
    timing = {"paint": 0.0, "encode": 0.0, "downsample": 0.0}

    def tiles() -> Iterator[bytes]:
        clock = time.perf_counter
        for ty in range(nty):
            for tx in range(ntx):
                t0 = clock()
                tile = painter.paint(ty, tx)
                t1 = clock()
                if isinstance(tile, int):
                    level1[ty * q : (ty + 1) * q, tx * q : (tx + 1) * q] = bg_small[tile]
                    timing["paint"] += t1 - t0
                    yield bg_bytes[tile]
                    continue
                data = _jpeg(tile, quality)
                t2 = clock()
                level1[ty * q : (ty + 1) * q, tx * q : (tx + 1) * q] = cv2.resize(
                    tile, (q, q), interpolation=cv2.INTER_AREA
                )
                timing["paint"] += t1 - t0
                timing["encode"] += t2 - t1
                timing["downsample"] += clock() - t2
                yield data

    shapes = level_shapes(width, height)
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": "jpeg",
        "metadata": None,
        "maxworkers": 1,
        "software": "stamp.synthetic",
    }
    generic_res: dict[str, Any] = {}
    if vendor == "generic" and mpp is not None:
        generic_res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    bigtiff = width * height * 3 > 3 * 2**30
    t_start = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        desc0 = (
            _aperio_desc(width, height, t, quality, ap_mpp, name, width, height)
            if vendor == "aperio"
            else None
        )
        tw.write(
            tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(t, t),
            description=desc0,
            **common,
            **generic_res,
        )
        t_l0 = time.perf_counter()
        levels = [level1[: shapes[1][1], : shapes[1][0]]]
        for w, h in shapes[2:]:
            levels.append(_reduce4(levels[-1])[:h, :w])
        t_low = time.perf_counter()
        if vendor == "aperio" and associated:
            thumb = _thumbnail(levels[-1], levels[-2], max_side=768)
            th, tw_ = thumb.shape[:2]
            tw.write(
                thumb,
                rowsperstrip=16,
                description=f"{APERIO_HEADER}{width}x{height} -> {tw_}x{th} - |AppMag = {round(10.0 / ap_mpp)}|MPP = {ap_mpp:g}",
                **common,
            )
        for (w, h), img in zip(shapes[1:], levels, strict=True):
            extra: dict[str, Any] = {}
            if vendor == "aperio":
                extra["description"] = _aperio_desc(width, height, t, quality, ap_mpp, name, w, h)
            else:
                extra.update(subfiletype=1, **generic_res)
            tw.write(img, tile=(t, t), **common, **extra)
        t_assoc = time.perf_counter()
        if vendor == "aperio" and associated:
            label = _label_image(name)
            lab_common: dict[str, Any] = {**common, "compression": "lzw"}
            tw.write(
                label,
                rowsperstrip=64,
                subfiletype=1,
                description=f"{APERIO_HEADER}label {label.shape[1]}x{label.shape[0]}",
                **lab_common,
            )
            macro = _macro_image(label, levels[-1])
            tw.write(
                macro,
                rowsperstrip=16,
                subfiletype=9,
                description=f"{APERIO_HEADER}macro {macro.shape[1]}x{macro.shape[0]}",
                **common,
            )
    t_end = time.perf_counter()
    if stats is not None:
        stats.update(timing)
        stats["level0_total"] = t_l0 - t_start
        stats["lower_levels"] = (t_low - t_l0) + (t_assoc - t_low)
        stats["associated"] = t_end - t_assoc
    return shapes


def _thumbnail(smallest: np.ndarray, larger: np.ndarray, max_side: int) -> np.ndarray:
    src = larger if max(larger.shape[:2]) >= max_side else smallest
    h, w = src.shape[:2]
    f = min(1.0, max_side / max(h, w))
    size = (max(16, round(w * f)), max(16, round(h * f)))
    return cv2.resize(src, size, interpolation=cv2.INTER_AREA)


def _macro_image(label: np.ndarray, overview: np.ndarray, height: int = 400) -> np.ndarray:
    """A glass-slide photo: label at the left, the tissue overview on grey glass at the right."""
    h, w = overview.shape[:2]
    f = (height - 40) / h
    ov = cv2.resize(overview, (max(1, round(w * f)), height - 40), interpolation=cv2.INTER_AREA)
    glass = np.full((height, height + ov.shape[1] + 40, 3), 225, np.uint8)
    glass[:, :height] = cv2.resize(label, (height, height), interpolation=cv2.INTER_AREA)
    glass[20 : 20 + ov.shape[0], height + 20 : height + 20 + ov.shape[1]] = ov
    return glass
