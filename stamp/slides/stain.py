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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_FIT_TILES",
    "MACENKO_REFERENCE_MAX_CONCENTRATIONS",
    "MACENKO_REFERENCE_STAINS",
    "REINHARD_REFERENCE_MEAN",
    "REINHARD_REFERENCE_STD",
    "STAIN_NORM_METHODS",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "SlideStainParams",
    "StainFitError",
    "StainNormalizer",
    "fit_slide_params",
    "get_normalizer",
    "sample_indices",
]

_logger = logging.getLogger("stamp")

SlideStainParams: TypeAlias = dict[str, Any]
"""JSON-serialisable per-slide parameters; ``params["method"]`` names the normaliser."""

TileInput: TypeAlias = np.ndarray | Sequence[np.ndarray]

STAIN_NORM_METHODS: Final = ("macenko", "reinhard")

PARAMS_VERSION: Final = 1

# ---------------------------------------------------------------------------------------------
# Bundled reference targets (numbers, not images).
#
# Macenko: the H&E reference stain matrix (unit OD vectors in R, G, B order; haematoxylin
# first) and the reference pseudo-maximum (99th percentile) stain concentrations. These are the
# widely used default target of Macenko normalisation (they go back to an early public MATLAB
# implementation of the method and are used by most later re-implementations). They were
# obtained with natural-log OD and I0 = 240; we use natural-log OD with I0 = 255 (so that white
# maps exactly to OD 0), a constant 0.06 OD difference that only slightly changes the target's
# contrast.
MACENKO_REFERENCE_STAINS: Final[tuple[tuple[float, float, float], tuple[float, float, float]]] = (
    (0.5626, 0.7201, 0.4062),  # haematoxylin
    (0.2159, 0.8012, 0.5581),  # eosin
)
MACENKO_REFERENCE_MAX_CONCENTRATIONS: Final[tuple[float, float]] = (1.9705, 1.0308)

# Reinhard: mean and standard deviation of the tissue pixels of a typical H&E image in float
# CIELAB units (D65; L* in [0, 100], a* and b* signed, i.e. OpenCV's 8-bit Lab with
# L = L8 * 100 / 255, a = a8 - 128, b = b8 - 128). No public image is shipped, so the values are
# *derived from the Macenko reference above*: an H&E rendering with the reference stains whose
# H and E concentrations are independent and exponentially distributed with their 99th
# percentile at the reference maxima (a common shape of stain-concentration histograms),
# measured on its tissue pixels (L* < REINHARD_TISSUE_MAX_LIGHTNESS) exactly like a slide is
# measured in ReinhardNormalizer.fit. ``_derive_reinhard_reference()`` recomputes them (the
# tests check it). The result (L* 65, a* +19, b* -12) is a typical pink-purple H&E look; both
# bundled targets thus describe the same reference appearance. Use ``fit_target(image)`` for a
# lab-specific target.
REINHARD_REFERENCE_MEAN: Final[tuple[float, float, float]] = (65.31, 19.37, -12.04)
REINHARD_REFERENCE_STD: Final[tuple[float, float, float]] = (14.43, 6.66, 5.84)

DEFAULT_MAX_FIT_TILES: Final = 64
"""At most this many tiles of a slide are used to fit its parameters."""

DEFAULT_MAX_FIT_PIXELS: Final = 1 << 21
"""At most this many pixels (deterministic stride over the sampled tiles) enter a fit."""

DEFAULT_MIN_TISSUE_PIXELS: Final = 5_000
"""Fewer tissue pixels than this in the sample -> :class:`StainFitError`."""

# Pixels whose channels are all <= this are treated as black padding (edge tiles that extend
# beyond the slide are padded black) and ignored when fitting.
_BLACK_MAX: Final = 5

# Pixels with L* below this count as tissue for Reinhard fitting (~ grey 210/255).
REINHARD_TISSUE_MAX_LIGHTNESS: Final = 85.0
# Reinhard transform: full normalisation at L* <= first value, none at L* >= second, linear
# in between, so white background stays white (pure Reinhard would tint it).
REINHARD_BACKGROUND_RAMP: Final[tuple[float, float]] = (85.0, 95.0)

_I0: Final = 255.0  # transmitted (background) light intensity for 8-bit images
_CHUNK_PIXELS = 1 << 18  # transform works on chunks of this many pixels (measured fastest)
_MAX_EXPONENT: Final = 200.0  # |M_cj * OD| bound: 3 * 200 + ln(255) < 709, float64 never overflows


class StainFitError(ValueError):
    """Stain parameters cannot be fitted for a slide (too little tissue, degenerate colours).

    The caller should skip stain normalisation for that slide and log a warning.
    """


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
# helpers


def sample_indices(n_tiles: int, max_tiles: int = DEFAULT_MAX_FIT_TILES) -> np.ndarray:
    """Deterministic, evenly spread indices of at most ``max_tiles`` out of ``n_tiles``.

    Useful for the caller to decide which tiles of a slide to keep for fitting.
    """
    if n_tiles <= 0:
        return np.zeros(0, dtype=np.int64)
    if max_tiles <= 0:
        raise ValueError(f"max_tiles must be positive, got {max_tiles}")
    if n_tiles <= max_tiles:
        return np.arange(n_tiles, dtype=np.int64)
    # centre of each of max_tiles equal strata (never picks the same tile twice)
    return ((np.arange(max_tiles, dtype=np.int64) * 2 + 1) * n_tiles) // (2 * max_tiles)


def _check_rgb_uint8(arr: np.ndarray, what: str) -> None:
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must have shape (..., H, W, 3), got {arr.shape}")


def _sample_pixels(
    tiles: TileInput, max_tiles: int, max_pixels: int = DEFAULT_MAX_FIT_PIXELS
) -> tuple[np.ndarray, int]:
    """(P, 3) uint8 pixels from a deterministic sample of the tiles, and the number of tiles."""
    if isinstance(tiles, np.ndarray):
        _check_rgb_uint8(tiles, "tiles")
        if tiles.ndim == 3:
            tiles = tiles[None]
        if tiles.ndim != 4:
            raise ValueError(f"tiles must have shape (N, H, W, 3) or (H, W, 3), got {tiles.shape}")
        chosen: list[np.ndarray] = [tiles[i] for i in sample_indices(len(tiles), max_tiles)]
    else:
        tile_list = list(tiles)
        chosen = [np.asarray(tile_list[i]) for i in sample_indices(len(tile_list), max_tiles)]
        for t in chosen:
            _check_rgb_uint8(t, "each tile")
            if t.ndim != 3:
                raise ValueError(f"each tile must have shape (H, W, 3), got {t.shape}")
    if not chosen:
        raise StainFitError("no tiles given to fit stain normalisation")
    pixels = np.concatenate([t.reshape(-1, 3) for t in chosen])
    if len(pixels) > max_pixels:
        step = -(-len(pixels) // max_pixels)  # ceil
        pixels = pixels[::step]
    return np.ascontiguousarray(pixels), len(chosen)


def _not_black(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=1) > _BLACK_MAX


def _od_lut(brightness_scale: float = 1.0) -> np.ndarray:
    """Optical density of each 8-bit intensity (natural log, I0 = 255; 0 treated as 1)."""
    v = np.clip(np.arange(256, dtype=np.float64) * brightness_scale, 1.0, _I0)
    return np.log(_I0 / v)


def _as_batch(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    _check_rgb_uint8(tiles, "tiles")
    return np.ascontiguousarray(tiles)


def _floats(x: Any) -> list[Any]:
    """Nested python floats (JSON-safe, exact repr) from an array-like."""
    return np.asarray(x, dtype=np.float64).tolist()


def _check_method(params: Mapping[str, Any], name: str) -> None:
    method = params.get("method")
    if method != name:
        raise ValueError(f"params are for stain normaliser {method!r}, not {name!r}")


def _rgb_to_lab8(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB -> (..., 3) uint8 OpenCV Lab (L8 = L* * 2.55, a8 = a* + 128, ...)."""
    flat = pixels.reshape(-1, 1, 3)
    return cv2.cvtColor(flat, cv2.COLOR_RGB2LAB).reshape(pixels.shape)


def _lab_stats(pixels: np.ndarray, max_lightness: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and std (float CIELAB units) of the tissue pixels of (P, 3) uint8 RGB pixels."""
    lab8 = _rgb_to_lab8(pixels)
    lab = lab8.astype(np.float64)
    lab[:, 0] *= 100.0 / 255.0
    lab[:, 1:] -= 128.0
    tissue = (lab[:, 0] < max_lightness) & _not_black(pixels)
    n = int(tissue.sum())
    if n == 0:
        return np.zeros(3), np.zeros(3), 0
    sel = lab[tissue]
    return sel.mean(axis=0), sel.std(axis=0), n


# ---------------------------------------------------------------------------------------------
# Macenko


@dataclasses.dataclass(frozen=True)
class MacenkoNormalizer:
    """Macenko et al. (2009) stain normalisation, fitted once per slide.

    beta: OD threshold; pixels with any channel OD < beta are ignored for the stain vectors.
    alpha: robust extreme angle percentile (alpha and 100 - alpha) in the stain plane.
    max_percentile: percentile used as each stain's pseudo-maximum concentration.
    luminosity_percentile: optional brightness standardisation (STAMP v1 used 90): intensities
        are scaled by 255 / (that percentile of the sample's L channel) before unmixing (never
        darkened). Fitted per slide. None (default) disables it.
    min_tissue_pixels: fewer usable pixels -> StainFitError.
    min_stain_angle_deg: estimated H and E vectors closer than this -> StainFitError (the
        unmixing would be ill-conditioned).
    stains / max_concentrations: the reference target (defaults: bundled H&E reference).
    """

    beta: float = 0.15
    alpha: float = 1.0
    max_percentile: float = 99.0
    luminosity_percentile: float | None = None
    min_tissue_pixels: int = DEFAULT_MIN_TISSUE_PIXELS
    min_stain_angle_deg: float = 5.0
    stains: tuple[tuple[float, float, float], tuple[float, float, float]] = MACENKO_REFERENCE_STAINS
    max_concentrations: tuple[float, float] = MACENKO_REFERENCE_MAX_CONCENTRATIONS

    def __post_init__(self) -> None:
        s = np.asarray(self.stains, dtype=np.float64)
        c = np.asarray(self.max_concentrations, dtype=np.float64)
        if s.shape != (2, 3) or c.shape != (2,):
            raise ValueError("Macenko target needs stains (2, 3) and max_concentrations (2,)")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(c)) and np.all(c > 0)):
            raise ValueError("Macenko target must be finite with positive max concentrations")
        if not 0 <= self.alpha < 50:
            raise ValueError(f"alpha must be in [0, 50), got {self.alpha}")
        # store unit vectors as plain float tuples (hashable, JSON-friendly); vectors that are
        # already unit (e.g. a target read back from params) are kept bit-identical
        norms = np.linalg.norm(s, axis=1, keepdims=True)
        unit = s if np.all(np.abs(norms - 1.0) <= 1e-12) else s / norms
        object.__setattr__(self, "stains", tuple(tuple(float(v) for v in row) for row in unit))
        object.__setattr__(self, "max_concentrations", tuple(float(v) for v in c))

    @property
    def name(self) -> str:
        return "macenko"

    @property
    def target(self) -> dict[str, Any]:
        return {
            "stain_matrix": [list(r) for r in self.stains],
            "max_concentrations": list(self.max_concentrations),
        }

    # -- fitting ------------------------------------------------------------------------------

    def _estimate(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Stain matrix (2, 3; H first), pseudo-max concentrations (2,), brightness scale, n."""
        valid = pixels[_not_black(pixels)]
        scale = 1.0
        if self.luminosity_percentile is not None and len(valid):
            lum = _rgb_to_lab8(valid)[:, 0]
            p = float(np.percentile(lum, self.luminosity_percentile))
            scale = max(1.0, _I0 / max(p, 1.0))
        od = _od_lut(scale).astype(np.float64)[valid]  # (P, 3)
        tissue = od[np.all(od >= self.beta, axis=1)]
        n = len(tissue)
        if n < self.min_tissue_pixels:
            raise StainFitError(
                f"too few tissue pixels to fit Macenko stain vectors: {n} pixels with optical "
                f"density >= beta={self.beta} in every channel (need >= {self.min_tissue_pixels})"
            )
        # Plane of the two largest singular directions of the OD tuples (uncentred, as the
        # stain model OD = C @ S passes through the origin): eigenvectors of OD^T OD.
        _, vecs = np.linalg.eigh(tissue.T @ tissue / n)
        v1, v2 = vecs[:, 2], vecs[:, 1]
        if v1.sum() < 0:  # deterministic signs
            v1 = -v1
        if v2[np.argmax(np.abs(v2))] < 0:
            v2 = -v2
        phi = np.arctan2(tissue @ v2, tissue @ v1)
        lo, hi = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        cand = np.stack([v1 * np.cos(a) + v2 * np.sin(a) for a in (lo, hi)])
        cand /= np.linalg.norm(cand, axis=1, keepdims=True)
        cand[cand.sum(axis=1) < 0] *= -1
        # haematoxylin first: the vector with the larger red OD component
        stains = cand if cand[0, 0] >= cand[1, 0] else cand[::-1]
        cos = float(np.clip(stains[0] @ stains[1], -1.0, 1.0))
        if math.degrees(math.acos(cos)) < self.min_stain_angle_deg:
            raise StainFitError(
                f"estimated stain vectors are nearly collinear ({math.degrees(math.acos(cos)):.2f} "
                f"deg < {self.min_stain_angle_deg} deg); the sample does not look like two stains"
            )
        # least-squares concentrations of all (non-padding) pixels; robust pseudo-maxima
        conc = od @ np.linalg.pinv(stains)  # (P, 2)
        max_conc = np.percentile(conc, self.max_percentile, axis=0)
        if not np.all(max_conc > 1e-3):
            raise StainFitError(
                f"stain concentration {self.max_percentile}th percentiles are ~0 ({max_conc}); "
                "the sample has too little stained tissue"
            )
        return stains, max_conc, scale, n

    def fit(self, tiles: TileInput, *, max_tiles: int = DEFAULT_MAX_FIT_TILES) -> SlideStainParams:
        pixels, n_tiles = _sample_pixels(tiles, max_tiles)
        stains, max_conc, scale, n = self._estimate(pixels)
        return {
            "method": self.name,
            "version": PARAMS_VERSION,
            "stain_matrix": _floats(stains),
            "max_concentrations": _floats(max_conc),
            "brightness_scale": float(scale),
            "target_stain_matrix": [list(r) for r in self.stains],
            "target_max_concentrations": list(self.max_concentrations),
            "beta": float(self.beta),
            "alpha": float(self.alpha),
            "max_percentile": float(self.max_percentile),
            "n_tiles": n_tiles,
            "n_pixels": len(pixels),
            "n_tissue_pixels": n,
        }

    def fit_target(self, image: TileInput) -> MacenkoNormalizer:
        pixels, _ = _sample_pixels(image, max_tiles=1 << 30)
        stains, max_conc, _, _ = dataclasses.replace(self, luminosity_percentile=None)._estimate(pixels)
        return dataclasses.replace(
            self,
            stains=tuple(tuple(float(v) for v in r) for r in stains),  # type: ignore[arg-type]
            max_concentrations=tuple(float(v) for v in max_conc),  # type: ignore[arg-type]
        )

    # -- transform ----------------------------------------------------------------------------

    @staticmethod
    def od_matrix(params: Mapping[str, Any]) -> np.ndarray:
        """The 3x3 map ``M`` with ``OD_out = OD_in @ M`` defined by a slide's parameters."""
        src = np.asarray(params["stain_matrix"], dtype=np.float64)
        tgt = np.asarray(params["target_stain_matrix"], dtype=np.float64)
        ratio = np.asarray(params["target_max_concentrations"], dtype=np.float64) / np.asarray(
            params["max_concentrations"], dtype=np.float64
        )
        return np.linalg.pinv(src) @ (ratio[:, None] * tgt)

    @staticmethod
    def _luts(params: Mapping[str, Any]) -> list[np.ndarray]:
        """For each output channel j a (256, 1, 3) float64 LUT with [v, 0, c] = factor of
        input channel c; their product over c is the output intensity."""
        m = MacenkoNormalizer.od_matrix(params)
        od = _od_lut(float(params.get("brightness_scale", 1.0)))
        # exponent table (256, c, j) = -OD(v) * M[c, j]; clipped only if |M| > 36 (pathological)
        expo = np.clip(-od[:, None, None] * m[None, :, :], -_MAX_EXPONENT, _MAX_EXPONENT)
        fac = np.exp(expo)
        fac[:, 0, :] *= _I0  # fold I0 into the red-channel factor
        return [np.ascontiguousarray(fac[:, :, j], dtype=np.float64).reshape(256, 1, 3) for j in range(3)]

    def transform(self, tiles: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        _check_method(params, self.name)
        batch = _as_batch(tiles)
        luts = self._luts(params)
        flat = batch.reshape(-1, 3)
        out = np.empty_like(flat)
        buf = np.empty((min(len(flat), _CHUNK_PIXELS), 3), dtype=np.float64)
        for s in range(0, len(flat), _CHUNK_PIXELS):
            x = flat[s : s + _CHUNK_PIXELS].reshape(-1, 1, 3)
            acc = buf[: len(x)]
            for j, lut in enumerate(luts):
                f = cv2.LUT(x, lut).reshape(-1, 3)
                np.multiply(f[:, 0], f[:, 1], out=acc[:, j])
                acc[:, j] *= f[:, 2]
            np.minimum(acc, 255.0, out=acc)
            acc += 0.5  # round half up; values are >= 0
            out[s : s + _CHUNK_PIXELS] = acc  # truncating cast
        return out.reshape(batch.shape)


# ---------------------------------------------------------------------------------------------
# Reinhard


@dataclasses.dataclass(frozen=True)
class ReinhardNormalizer:
    """Reinhard et al. (2001) colour transfer in CIELAB, statistics fitted once per slide.

    Statistics are taken over tissue pixels (L* < tissue_max_lightness, no black padding).
    The transform blends towards the original for light pixels (``background_ramp`` in L*), so
    white background stays white.
    mean / std: reference target in float CIELAB units (defaults: bundled H&E reference).
    """

    tissue_max_lightness: float = REINHARD_TISSUE_MAX_LIGHTNESS
    background_ramp: tuple[float, float] = REINHARD_BACKGROUND_RAMP
    min_tissue_pixels: int = DEFAULT_MIN_TISSUE_PIXELS
    min_std: float = 0.5
    mean: tuple[float, float, float] = REINHARD_REFERENCE_MEAN
    std: tuple[float, float, float] = REINHARD_REFERENCE_STD

    def __post_init__(self) -> None:
        m = np.asarray(self.mean, dtype=np.float64)
        s = np.asarray(self.std, dtype=np.float64)
        if m.shape != (3,) or s.shape != (3,) or not (np.all(np.isfinite(m)) and np.all(s > 0)):
            raise ValueError("Reinhard target needs finite mean (3,) and positive std (3,)")
        lo, hi = self.background_ramp
        if not lo < hi:
            raise ValueError(f"background_ramp must be increasing, got {self.background_ramp}")
        object.__setattr__(self, "mean", tuple(float(v) for v in m))
        object.__setattr__(self, "std", tuple(float(v) for v in s))
        object.__setattr__(self, "background_ramp", (float(lo), float(hi)))

    @property
    def name(self) -> str:
        return "reinhard"

    @property
    def target(self) -> dict[str, Any]:
        return {"lab_mean": list(self.mean), "lab_std": list(self.std)}

    def _stats(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        mean, std, n = _lab_stats(pixels, self.tissue_max_lightness)
        if n < self.min_tissue_pixels:
            raise StainFitError(
                f"too few tissue pixels to fit Reinhard statistics: {n} pixels with "
                f"L* < {self.tissue_max_lightness} (need >= {self.min_tissue_pixels})"
            )
        if np.any(std < self.min_std):
            raise StainFitError(
                f"CIELAB standard deviation {np.round(std, 3).tolist()} below {self.min_std}: "
                "the sample is (nearly) uniform in colour"
            )
        return mean, std, n

    def fit(self, tiles: TileInput, *, max_tiles: int = DEFAULT_MAX_FIT_TILES) -> SlideStainParams:
        pixels, n_tiles = _sample_pixels(tiles, max_tiles)
        mean, std, n = self._stats(pixels)
        return {
            "method": self.name,
            "version": PARAMS_VERSION,
            "lab_mean": _floats(mean),
            "lab_std": _floats(std),
            "target_lab_mean": list(self.mean),
            "target_lab_std": list(self.std),
            "background_ramp": list(self.background_ramp),
            "tissue_max_lightness": float(self.tissue_max_lightness),
            "n_tiles": n_tiles,
            "n_pixels": len(pixels),
            "n_tissue_pixels": n,
        }

    def fit_target(self, image: TileInput) -> ReinhardNormalizer:
        pixels, _ = _sample_pixels(image, max_tiles=1 << 30)
        mean, std, _ = self._stats(pixels)
        return dataclasses.replace(
            self,
            mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        )

    @staticmethod
    def _luts(params: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(256, 1, 3) uint8 LUT on OpenCV Lab8 channels, and (256,) uint16 blend weights
        (0..256) indexed by the source L8."""
        src_m = np.asarray(params["lab_mean"], dtype=np.float64)
        src_s = np.asarray(params["lab_std"], dtype=np.float64)
        tgt_m = np.asarray(params["target_lab_mean"], dtype=np.float64)
        tgt_s = np.asarray(params["target_lab_std"], dtype=np.float64)
        v = np.arange(256, dtype=np.float64)
        # Lab8 value -> float CIELAB units, per channel
        unit = np.stack([v * (100.0 / 255.0), v - 128.0, v - 128.0], axis=1)
        mapped = (unit - src_m) * (tgt_s / src_s) + tgt_m
        back = mapped.copy()
        back[:, 0] *= 255.0 / 100.0
        back[:, 1:] += 128.0
        lut = np.clip(np.floor(back + 0.5), 0, 255).astype(np.uint8).reshape(256, 1, 3)
        lo, hi = (float(x) for x in params["background_ramp"])
        w = np.clip((hi - unit[:, 0]) / (hi - lo), 0.0, 1.0)
        weights = np.floor(w * 256.0 + 0.5).astype(np.uint16)
        return lut, weights

    def transform(self, tiles: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        _check_method(params, self.name)
        batch = _as_batch(tiles)
        lut, weights = self._luts(params)
        w_lut = weights.reshape(256, 1)
        flat = batch.reshape(-1, 3)
        out = np.empty_like(flat)
        for s in range(0, len(flat), _CHUNK_PIXELS):
            x = flat[s : s + _CHUNK_PIXELS].reshape(-1, 1, 3)
            lab = cv2.cvtColor(x, cv2.COLOR_RGB2LAB)
            norm = cv2.cvtColor(cv2.LUT(lab, lut), cv2.COLOR_LAB2RGB).reshape(-1, 3)
            w_raw = cv2.LUT(np.ascontiguousarray(lab[:, 0, 0]), w_lut)
            w = np.asarray(w_raw, dtype=np.uint16).reshape(-1, 1)  # 0..256 by source L8
            # integer blend (orig * (256 - w) + norm * w + 128) >> 8, exact in uint16 (max 65408);
            # w = 256 -> norm, w = 0 -> orig unchanged
            acc = x.reshape(-1, 3).astype(np.uint16)
            acc *= 256 - w
            nrm = norm.astype(np.uint16)
            nrm *= w
            acc += nrm
            acc += 128
            acc >>= 8
            out[s : s + _CHUNK_PIXELS] = acc
        return out.reshape(batch.shape)


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


def _derive_reinhard_reference(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Recompute REINHARD_REFERENCE_MEAN/STD from the Macenko reference (see the constants)."""
    u = (np.arange(n) + 0.5) / n
    q = -np.log1p(-u) / math.log(100.0)  # exponential quantiles, 99th percentile -> 1
    c_h, c_e = np.meshgrid(
        q * MACENKO_REFERENCE_MAX_CONCENTRATIONS[0], q * MACENKO_REFERENCE_MAX_CONCENTRATIONS[1]
    )
    od = np.stack([c_h.ravel(), c_e.ravel()], axis=1) @ np.asarray(MACENKO_REFERENCE_STAINS)
    rgb = np.clip(np.floor(_I0 * np.exp(-od) + 0.5), 0, 255).astype(np.uint8)
    mean, std, _ = _lab_stats(rgb, REINHARD_TISSUE_MAX_LIGHTNESS)
    return mean, std
