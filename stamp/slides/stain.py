"""Per-slide stain normalisation for H&E tiles (Macenko 2009, Reinhard 2001).

Optional preprocessing step (``stain_norm: macenko | reinhard``, off by default). STAMP v2 has
no stain normalisation (STAMP issue #119); STAMP v1 had Macenko. Both methods here are written
from the published descriptions:

* Macenko et al., "A method for normalizing histology slides for quantitative analysis",
  ISBI 2009: convert to optical density (Beer-Lambert), drop near-transparent pixels
  (OD < beta), find the plane of the two largest singular directions of the OD tuples,
  take the robust extremes (alpha / 100-alpha percentiles) of the angle within that plane as
  the two stain vectors, unmix by least squares, scale each stain's concentrations so that its
  pseudo-maximum (99th percentile) matches the reference, and re-mix with the reference stains.
* Reinhard et al., "Color transfer between images", IEEE CG&A 2001: per-channel
  mean/standard-deviation matching in a decorrelated colour space. We use CIELAB (D65, via
  OpenCV) instead of Ruderman's l-alpha-beta, as is usual for histology.

Workflow: the parameters are **fitted once per slide** from a deterministic sample of its
tissue tiles (:meth:`StainNormalizer.fit`) and then the **same** parameters are applied to
every tile of that slide (:meth:`StainNormalizer.transform`). The transform is purely per
pixel, so a tile's result does not depend on which batch it is in. Parameters are small
JSON-serialisable dicts (record them in the h5 attrs / logs) that fully describe the transform,
reference target included. If a slide has too little tissue to fit, :class:`StainFitError` is
raised; the caller should then skip normalisation for that slide with a warning
(:func:`fit_slide_params` does exactly that).

Implementation notes (speed and bit-exact determinism):

* Macenko: the whole per-slide transform is a fixed 3x3 linear map ``M`` in OD space,
  ``OD_out = OD_in @ M``. Because ``I_out_j = 255 * exp(-sum_c OD_c M_cj)
  = 255 * prod_c exp(-M_cj OD(I_c))``, it is evaluated with three 256-entry look-up tables per
  output channel and two multiplications, without any per-pixel ``exp``/``log``.
* Reinhard: RGB -> 8-bit CIELAB -> per-channel 256-entry LUT -> RGB (all integer paths in
  OpenCV), then an integer blend with the original towards white background.
* Only table look-ups, IEEE multiplications and integer arithmetic act per pixel, so the output
  bytes are identical however the tiles are batched or chunked.

The tile sample is chosen by position in the given sequence (:func:`sample_indices`); pass the
tiles of a slide in a canonical order (e.g. sorted by their coordinates) to make the fitted
parameters reproducible across runs, because tile reading order may be nondeterministic.

Module layout: this module is the entry point (:class:`StainNormalizer`, :func:`get_normalizer`,
:func:`fit_slide_params`); the implementations live in :mod:`stamp.slides.stain_macenko`
(:class:`~stamp.slides.stain_macenko.MacenkoNormalizer`) and :mod:`stamp.slides.stain_reinhard`
(:class:`~stamp.slides.stain_reinhard.ReinhardNormalizer`), which share
:mod:`stamp.slides.stain_common` (types, reference targets,
:class:`~stamp.slides.stain_common.StainFitError`, sampling).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np

from stamp.slides.stain_common import (
    DEFAULT_MAX_FIT_TILES,
    SlideStainParams,
    StainFitError,
    TileInput,
)
from stamp.slides.stain_macenko import MacenkoNormalizer
from stamp.slides.stain_reinhard import ReinhardNormalizer

__all__ = ["STAIN_NORM_METHODS", "StainNormalizer", "fit_slide_params", "get_normalizer"]

_logger = logging.getLogger("stamp")

STAIN_NORM_METHODS: Final = ("macenko", "reinhard")


@runtime_checkable
class StainNormalizer(Protocol):
    """A stain normaliser with a fixed reference target and per-slide fitted parameters."""

    @property
    def name(self) -> str:
        """``"macenko"`` or ``"reinhard"``; equals ``params["method"]``."""
        ...

    @property
    def target(self) -> dict[str, Any]:
        """The reference target as a JSON-serialisable dict."""
        ...

    def fit(self, tiles: TileInput, *, max_tiles: int = DEFAULT_MAX_FIT_TILES) -> SlideStainParams:
        """Fit per-slide parameters once from (a deterministic sample of) a slide's tissue tiles.

        ``tiles``: uint8 RGB, shape (N, H, W, 3) or (H, W, 3), or a sequence of (H, W, 3) arrays
        (sizes may differ). Raises :class:`StainFitError` if the sample is unusable.
        """
        ...

    def transform(self, tiles: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Normalise uint8 RGB tiles (N, H, W, 3) or (H, W, 3) with a slide's parameters.

        Returns a new uint8 array of the same shape. Per-pixel: independent of batching.
        """
        ...

    def fit_target(self, image: TileInput) -> StainNormalizer:
        """Return a copy of this normaliser whose reference target is fitted from ``image``."""
        ...


# ---------------------------------------------------------------------------------------------
# factory / caller helpers


def get_normalizer(
    name: str | None, *, target: Mapping[str, Any] | np.ndarray | None = None, **options: Any
) -> StainNormalizer | None:
    """Normaliser for ``stain_norm`` (``"macenko"``, ``"reinhard"``; None/"none" -> None).

    target: None for the bundled reference; a target dict (``normalizer.target`` of the same
    method) or a uint8 RGB reference image to fit a custom target from.
    options: keyword arguments of the normaliser class (e.g. ``beta``, ``alpha``).
    """
    if name is None or str(name).lower() in ("", "none", "off"):
        return None
    key = str(name).lower()
    normalizer: MacenkoNormalizer | ReinhardNormalizer
    if key == "macenko":
        if isinstance(target, Mapping):
            options = {
                **options,
                "stains": tuple(tuple(r) for r in target["stain_matrix"]),
                "max_concentrations": tuple(target["max_concentrations"]),
            }
        normalizer = MacenkoNormalizer(**options)
    elif key == "reinhard":
        if isinstance(target, Mapping):
            options = {
                **options,
                "mean": tuple(target["lab_mean"]),
                "std": tuple(target["lab_std"]),
            }
        normalizer = ReinhardNormalizer(**options)
    else:
        raise ValueError(
            f"unknown stain normalisation {name!r}; expected one of {STAIN_NORM_METHODS} or None"
        )
    if isinstance(target, np.ndarray):
        normalizer = normalizer.fit_target(target)
    return normalizer


def fit_slide_params(
    normalizer: StainNormalizer,
    tiles: TileInput,
    *,
    slide: str = "",
    max_tiles: int = DEFAULT_MAX_FIT_TILES,
) -> SlideStainParams | None:
    """``normalizer.fit`` that logs a warning and returns None (= skip normalisation for this
    slide) when the slide cannot be fitted."""
    try:
        return normalizer.fit(tiles, max_tiles=max_tiles)
    except StainFitError as e:
        _logger.warning("stain normalisation (%s) skipped for slide %s: %s", normalizer.name, slide or "?", e)
        return None
