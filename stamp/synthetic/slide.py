"""One synthetic slide: :class:`SlideSpec` in, TIFF + ground-truth files + :class:`SlideTruth` out.

Files written for ``<dir>/<stem>.svs`` (any suffix)::

    <stem>.svs                 the slide (levels at downsample 1, 4, 16, ...)
    <stem>.tissue.geojson      tissue polygons (holes as interior rings), level-0 px
    <stem>.biomarker.geojson   planted-region polygons (no features for negatives)
    <stem>.tissue.png          tissue mask, one pixel per ``mask_downsample``² level-0 px
    <stem>.biomarker.png       planted mask, same grid

Both GeoJSON files carry the truth metadata as the foreign member
``stamp_synthetic`` (that is what :meth:`SlideTruth.load` reads).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from stamp.fileio import atomic_write_bytes
from stamp.synthetic.paint import TilePainter
from stamp.synthetic.regions import (
    SlideFields,
    feature_collection,
    make_fields,
    rect_fraction,
    score_polygons,
)
from stamp.synthetic.texture import get_atlases
from stamp.synthetic.tiff import level_shapes, write_pyramid

TRUTH_FORMAT_VERSION = 1
_NOMINAL_MPP = 0.5  # texture scale for slides written without an mpp


def slide_seed(seed: int, index: int) -> int:
    """The ``index``-th slide seed derived from a cohort ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class SlideSpec:
    """What to render. ``planted_fraction`` is the fraction of the *tissue* area that is planted.

    ``vendor="aperio"`` needs an ``mpp``; ``vendor="generic"`` writes resolution
    tags only when ``mpp`` is given. ``blank=True`` gives a slide with no tissue.
    ``texture_seed`` picks the (cached) texture atlases; ``seed`` everything else.
    """

    width: int = 4096
    height: int = 4096
    mpp: float | None = 0.5
    planted_fraction: float = 0.0
    seed: int = 0
    vendor: Literal["aperio", "generic"] = "aperio"
    tile_size: int = 256
    jpeg_quality: int = 80
    mask_downsample: int = 32
    texture_seed: int = 0
    blank: bool = False
    associated: bool = True

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"slide must be at least 64x64 px, got {self.width}x{self.height}")
        if self.vendor not in ("aperio", "generic"):
            raise ValueError(f"vendor must be 'aperio' or 'generic', got {self.vendor!r}")
        if self.vendor == "aperio" and self.mpp is None:
            raise ValueError("vendor='aperio' needs an mpp; use vendor='generic' for a slide without one")
        if self.mpp is not None and not 0.05 <= self.mpp <= 20:
            raise ValueError(f"mpp must be in [0.05, 20] µm/px, got {self.mpp}")
        if not 0.0 <= self.planted_fraction <= 1.0:
            raise ValueError(f"planted_fraction must be in [0, 1], got {self.planted_fraction}")
        if self.tile_size % 16 or self.tile_size % self.mask_downsample or self.tile_size > 256:
            raise ValueError(
                f"tile_size must be a multiple of 16 and of mask_downsample ({self.mask_downsample}) and <= 256,"
                f" got {self.tile_size}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass
class SlideTruth:
    """Ground truth of a written slide; query it with level-0 pixel rectangles.

    ``planted_fraction`` = planted / tissue area and ``tissue_fraction`` =
    tissue / slide area, both counted in mask cells (a cell is in a mask when at
    least half of it is painted as that region). Masks, and so the ``*_at``
    queries, are exact to about half a cell (``mask_downsample / 2`` px) at region
    boundaries. They are loaded lazily from the PNGs (or kept from the writer).
    """

    slide_path: Path
    tissue_geojson: Path
    biomarker_geojson: Path
    tissue_png: Path
    biomarker_png: Path
    width: int
    height: int
    mpp: float | None
    vendor: str
    mask_downsample: int
    tissue_fraction: float
    planted_fraction: float
    level_shapes: list[tuple[int, int]]
    seed: int
    _masks: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tissue, planted)`` boolean masks, one cell per ``mask_downsample``² level-0 px."""
        if self._masks is None:
            self._masks = (_read_mask(self.tissue_png), _read_mask(self.biomarker_png))
        return self._masks

    def tissue_fraction_at(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction of the level-0 rectangle ``(x, y, w, h)`` that is tissue."""
        return rect_fraction(self.masks()[0], self.mask_downsample, x, y, w, h)

    def planted_fraction_at(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction of the level-0 rectangle ``(x, y, w, h)`` that is planted biomarker."""
        return rect_fraction(self.masks()[1], self.mask_downsample, x, y, w, h)

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready dict; paths relative to ``relative_to`` when given."""

        def p(path: Path) -> str:
            return (path.relative_to(relative_to) if relative_to else path).as_posix()

        return {
            "slide_path": p(self.slide_path),
            "tissue_geojson": p(self.tissue_geojson),
            "biomarker_geojson": p(self.biomarker_geojson),
            "tissue_png": p(self.tissue_png),
            "biomarker_png": p(self.biomarker_png),
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "vendor": self.vendor,
            "mask_downsample": self.mask_downsample,
            "tissue_fraction": round(self.tissue_fraction, 6),
            "planted_fraction": round(self.planted_fraction, 6),
            "level_shapes": [list(s) for s in self.level_shapes],
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> SlideTruth:
        """Inverse of :meth:`to_dict` (relative paths are resolved against ``root``)."""
        base = root or Path()
        return cls(
            slide_path=base / d["slide_path"],
            tissue_geojson=base / d["tissue_geojson"],
            biomarker_geojson=base / d["biomarker_geojson"],
            tissue_png=base / d["tissue_png"],
            biomarker_png=base / d["biomarker_png"],
            width=int(d["width"]),
            height=int(d["height"]),
            mpp=d["mpp"],
            vendor=d["vendor"],
            mask_downsample=int(d["mask_downsample"]),
            tissue_fraction=float(d["tissue_fraction"]),
            planted_fraction=float(d["planted_fraction"]),
            level_shapes=[tuple(s) for s in d["level_shapes"]],  # type: ignore[misc]
            seed=int(d["seed"]),
        )

    @classmethod
    def load(cls, slide_path: Path) -> SlideTruth:
        """Read the truth of a slide written by :func:`write_slide` from its ``.tissue.geojson``."""
        slide_path = Path(slide_path)
        meta = json.loads(_sidecar(slide_path, "tissue.geojson").read_text())["stamp_synthetic"]
        return cls.from_dict(meta, root=slide_path.parent)


def _sidecar(slide_path: Path, suffix: str) -> Path:
    return slide_path.with_name(f"{slide_path.stem}.{suffix}")


def _read_mask(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"cannot read mask {path}")
    return img > 127


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:  # pragma: no cover - cv2 always encodes a uint8 image
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _write_truth_files(
    path: Path, spec: SlideSpec, fields: SlideFields, shapes: list[tuple[int, int]]
) -> SlideTruth:
    truth = SlideTruth(
        slide_path=path,
        tissue_geojson=_sidecar(path, "tissue.geojson"),
        biomarker_geojson=_sidecar(path, "biomarker.geojson"),
        tissue_png=_sidecar(path, "tissue.png"),
        biomarker_png=_sidecar(path, "biomarker.png"),
        width=spec.width,
        height=spec.height,
        mpp=spec.mpp,
        vendor=spec.vendor,
        mask_downsample=fields.downsample,
        tissue_fraction=fields.tissue_fraction,
        planted_fraction=fields.planted_fraction,
        level_shapes=shapes,
        seed=spec.seed,
        _masks=(fields.tissue_mask, fields.planted_mask),
    )
    meta = truth.to_dict(relative_to=path.parent)
    meta["coordinates"] = "level-0 pixels, origin top-left, x right, y down"
    meta["planted_fraction_definition"] = "planted cells / tissue cells; a cell counts when >= half painted"
    atomic_write_bytes(truth.tissue_png, _png(fields.tissue_mask))
    atomic_write_bytes(truth.biomarker_png, _png(fields.planted_mask))
    for score, gj, name, color in (
        (fields.tissue_score, truth.tissue_geojson, "Tissue", (0, 160, 0)),
        (fields.planted_score, truth.biomarker_geojson, "Biomarker", (200, 0, 200)),
    ):
        polys = score_polygons(score, fields.downsample, spec.width, spec.height)
        fc = feature_collection(polys, name, color, meta)
        atomic_write_bytes(gj, json.dumps(fc, separators=(",", ":")).encode())
    return truth


def write_slide(path: Path, spec: SlideSpec, stats: dict[str, float] | None = None) -> SlideTruth:
    """Write a synthetic slide to ``path`` (temp name + atomic rename) and its truth files beside it.

    The truth files are written first, so an existing slide always has them.
    ``stats``, if given, is filled with phase timings in seconds. Returns the
    slide's :class:`SlideTruth`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([int(spec.seed), 0x51DE]))
    fields = make_fields(
        rng, spec.width, spec.height, spec.mask_downsample, spec.planted_fraction, blank=spec.blank
    )
    t1 = time.perf_counter()
    atlases = get_atlases(spec.texture_seed, spec.mpp or _NOMINAL_MPP)
    t2 = time.perf_counter()
    painter = TilePainter(fields, atlases, spec.tile_size, rng, mpp=spec.mpp or _NOMINAL_MPP)
    truth = _write_truth_files(path, spec, fields, level_shapes(spec.width, spec.height))
    t3 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_pyramid(
            tmp,
            painter,
            spec.width,
            spec.height,
            spec.vendor,
            spec.mpp,
            spec.jpeg_quality,
            name=path.stem,
            associated=spec.associated,
            stats=stats,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if stats is not None:
        stats.update(masks=t1 - t0, atlases=t2 - t1, truth_files=t3 - t2, total=time.perf_counter() - t0)
    return truth
