"""Macenko et al. (2009) stain normalisation (:class:`MacenkoNormalizer`).

Part of the stain normalisation package; import it from the public front
:mod:`stamp.slides.stain`. Method (from the published description, Macenko et al., "A method
for normalizing histology slides for quantitative analysis", ISBI 2009): convert to optical
density (Beer-Lambert), drop near-transparent pixels (OD < beta), find the plane of the two
largest singular directions of the OD tuples, take the robust extremes (alpha / 100-alpha
percentiles) of the angle within that plane as the two stain vectors, unmix by least squares,
scale each stain's concentrations so that its pseudo-maximum (99th percentile) matches the
reference, and re-mix with the reference stains.

The whole per-slide transform is a fixed 3x3 linear map ``M`` in OD space,
``OD_out = OD_in @ M``. Because ``I_out_j = 255 * exp(-sum_c OD_c M_cj)
= 255 * prod_c exp(-M_cj OD(I_c))``, it is evaluated with three 256-entry look-up tables per
output channel and two multiplications, without any per-pixel ``exp``/``log``; the output bytes
are therefore identical however the tiles are batched or chunked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

import cv2
import numpy as np

from stamp.slides import stain_common
from stamp.slides.stain_common import (
    DEFAULT_MAX_FIT_TILES,
    DEFAULT_MIN_TISSUE_PIXELS,
    I0,
    MACENKO_REFERENCE_MAX_CONCENTRATIONS,
    MACENKO_REFERENCE_STAINS,
    PARAMS_VERSION,
    SlideStainParams,
    StainFitError,
    TileInput,
    as_rgb_batch,
    check_method,
    json_floats,
    not_black,
    rgb_to_lab8,
    sample_pixels,
)

__all__ = ["MacenkoNormalizer"]

_MAX_EXPONENT: Final = 200.0  # |M_cj * OD| bound: 3 * 200 + ln(255) < 709, float64 never overflows


def _od_lut(brightness_scale: float = 1.0) -> np.ndarray:
    """Optical density of each 8-bit intensity (natural log, I0 = 255; 0 treated as 1)."""
    v = np.clip(np.arange(256, dtype=np.float64) * brightness_scale, 1.0, I0)
    return np.log(I0 / v)


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
        valid = pixels[not_black(pixels)]
        scale = 1.0
        if self.luminosity_percentile is not None and len(valid):
            lum = rgb_to_lab8(valid)[:, 0]
            p = float(np.percentile(lum, self.luminosity_percentile))
            scale = max(1.0, I0 / max(p, 1.0))
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
        pixels, n_tiles = sample_pixels(tiles, max_tiles)
        stains, max_conc, scale, n = self._estimate(pixels)
        return {
            "method": self.name,
            "version": PARAMS_VERSION,
            "stain_matrix": json_floats(stains),
            "max_concentrations": json_floats(max_conc),
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
        pixels, _ = sample_pixels(image, max_tiles=1 << 30)
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
        fac[:, 0, :] *= I0  # fold I0 into the red-channel factor
        return [np.ascontiguousarray(fac[:, :, j], dtype=np.float64).reshape(256, 1, 3) for j in range(3)]

    def transform(self, tiles: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        check_method(params, self.name)
        batch = as_rgb_batch(tiles)
        luts = self._luts(params)
        flat = batch.reshape(-1, 3)
        out = np.empty_like(flat)
        chunk = stain_common.CHUNK_PIXELS  # module attribute: tests monkeypatch it
        buf = np.empty((min(len(flat), chunk), 3), dtype=np.float64)
        for s in range(0, len(flat), chunk):
            x = flat[s : s + chunk].reshape(-1, 1, 3)
            acc = buf[: len(x)]
            for j, lut in enumerate(luts):
                f = cv2.LUT(x, lut).reshape(-1, 3)
                np.multiply(f[:, 0], f[:, 1], out=acc[:, j])
                acc[:, j] *= f[:, 2]
            np.minimum(acc, 255.0, out=acc)
            acc += 0.5  # round half up; values are >= 0
            out[s : s + chunk] = acc  # truncating cast
        return out.reshape(batch.shape)
