"""Microns per pixel (MPP) of a slide's level 0, resolved in STAMP's order.

Order (first hit wins; only the x spacing is used, like STAMP):

1. ``openslide.mpp-x`` — OpenSlide's own reading of the vendor metadata. For the tifffile reader,
   which has no such property, the same two sources OpenSlide would use are read directly: an
   Aperio ``MPP = …`` field in the ImageDescription, then the TIFF resolution tags when their unit is
   centimetre or inch.
2. ``<PixelSizeMicrons>…</PixelSizeMicrons>`` in ``openslide.comment`` (or the ImageDescription).
3. OME-XML ``Image/Pixels@PhysicalSizeX`` in ``tiff.ImageDescription`` (we honour
   ``PhysicalSizeXUnit``; STAMP assumes µm).
4. ``default_slide_mpp`` from the config, with a warning (a fallback, never an override — STAMP's
   docstring says "override", its code and ours use it only as fallback).
5. Otherwise :class:`MPPError`, telling the user to set ``preprocessing.default_slide_mpp``.

A value that is not a finite positive number is skipped (logged) and the next source is tried.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from stamp.slides.reader_base import SlideError, SlideReader

_logger = logging.getLogger("stamp")

_PIXEL_SIZE_MICRONS = re.compile(r"<PixelSizeMicrons>(.*?)</PixelSizeMicrons>", re.DOTALL)
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
# OME length units → µm
_OME_UNITS_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "\u03bcm": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
# MPPs outside this range are accepted but flagged: they are almost always metadata errors.
_PLAUSIBLE_MPP = (0.05, 50.0)


class MPPError(SlideError):
    """No usable microns-per-pixel value for a slide."""


def _positive(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _from_openslide(props: Mapping[str, str]) -> float | None:
    return _positive(props.get("openslide.mpp-x"))


def _from_aperio_description(props: Mapping[str, str]) -> float | None:
    desc = props.get("tiff.ImageDescription", "")
    if not desc.startswith("Aperio"):
        return None
    m = _APERIO_MPP.search(desc)
    return _positive(m.group(1)) if m else None


def _from_resolution_tags(props: Mapping[str, str]) -> float | None:
    unit = props.get("tiff.ResolutionUnit", "")
    res = _positive(props.get("tiff.XResolution"))
    if res is None:
        return None
    if unit == "centimeter":
        return 1e4 / res
    if unit == "inch":
        return 25400.0 / res
    return None


def _from_comment(props: Mapping[str, str]) -> float | None:
    text = props.get("openslide.comment") or props.get("tiff.ImageDescription", "")
    m = _PIXEL_SIZE_MICRONS.search(text)
    return _positive(m.group(1).strip()) if m else None


def _from_ome(props: Mapping[str, str]) -> float | None:
    desc = props.get("tiff.ImageDescription", "")
    if "PhysicalSizeX" not in desc:
        return None
    try:
        root = ET.fromstring(desc.strip())
    except ET.ParseError:
        _logger.debug("ImageDescription mentions PhysicalSizeX but is not XML")
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in el.attrib:
            value = _positive(el.attrib["PhysicalSizeX"])
            if value is None:
                return None
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            factor = _OME_UNITS_UM.get(unit)
            if factor is None:
                _logger.warning("unknown OME PhysicalSizeXUnit %r, assuming µm", unit)
                factor = 1.0
            return value * factor
    return None


def resolve_mpp(reader: SlideReader, default_slide_mpp: float | None = None) -> tuple[float, str]:
    """The level-0 MPP of ``reader``'s slide and the name of the source it came from.

    Sources: ``openslide.mpp-x``, ``aperio.MPP``, ``tiff.resolution``, ``PixelSizeMicrons``,
    ``OME PhysicalSizeX``, ``default_slide_mpp``. Raises :class:`MPPError` when none applies.
    """
    props = reader.properties
    sources = [("openslide.mpp-x", _from_openslide)]
    if reader.name != "openslide":
        # the tifffile reader: read what OpenSlide would have turned into openslide.mpp-x
        sources += [("aperio.MPP", _from_aperio_description), ("tiff.resolution", _from_resolution_tags)]
    sources += [("PixelSizeMicrons", _from_comment), ("OME PhysicalSizeX", _from_ome)]
    for name, getter in sources:
        mpp = getter(props)
        if mpp is not None:
            if not _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
                _logger.warning(
                    "%s: implausible MPP %.6g µm/px from %s; check the slide metadata", reader.path, mpp, name
                )
            return mpp, name
    if default_slide_mpp is not None:
        mpp = _positive(default_slide_mpp)
        if mpp is None:
            raise MPPError(
                reader.path, f"default_slide_mpp must be a positive number, got {default_slide_mpp!r}"
            )
        _logger.warning(
            "%s: no MPP in the slide metadata; using preprocessing.default_slide_mpp = %g µm/px",
            reader.path,
            mpp,
        )
        return mpp, "default_slide_mpp"
    raise MPPError(
        reader.path,
        "no microns-per-pixel (MPP) in the slide metadata; set preprocessing.default_slide_mpp "
        "(e.g. 0.25 for 40x, 0.5 for 20x scans) to tile it",
    )
