"""Reinhard et al. (2001) colour transfer in CIELAB (:class:`ReinhardNormalizer`).

Part of the stain normalisation package; import it from the public front
:mod:`stamp.slides.stain`. Method (from the published description, Reinhard et al., "Color
transfer between images", IEEE CG&A 2001): per-channel mean/standard-deviation matching in a
decorrelated colour space. We use CIELAB (D65, via OpenCV) instead of Ruderman's
l-alpha-beta, as is usual for histology.

The transform is RGB -> 8-bit CIELAB -> per-channel 256-entry LUT -> RGB (all integer paths in
OpenCV), then an integer blend with the original towards white background, so the output bytes
are identical however the tiles are batched or chunked. ``derive_reinhard_reference``
recomputes the bundled target (``REINHARD_REFERENCE_MEAN`` / ``_STD``) from the Macenko
reference.
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
    REINHARD_REFERENCE_MEAN,
    REINHARD_REFERENCE_STD,
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

__all__ = [
    "REINHARD_BACKGROUND_RAMP",
    "REINHARD_TISSUE_MAX_LIGHTNESS",
    "ReinhardNormalizer",
]

# Pixels with L* below this count as tissue for Reinhard fitting (~ grey 210/255).
REINHARD_TISSUE_MAX_LIGHTNESS: Final = 85.0
# Reinhard transform: full normalisation at L* <= first value, none at L* >= second, linear
# in between, so white background stays white (pure Reinhard would tint it).
REINHARD_BACKGROUND_RAMP: Final[tuple[float, float]] = (85.0, 95.0)


def _lab_stats(pixels: np.ndarray, max_lightness: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and std (float CIELAB units) of the tissue pixels of (P, 3) uint8 RGB pixels."""
    lab8 = rgb_to_lab8(pixels)
    lab = lab8.astype(np.float64)
    lab[:, 0] *= 100.0 / 255.0
    lab[:, 1:] -= 128.0
    tissue = (lab[:, 0] < max_lightness) & not_black(pixels)
    n = int(tissue.sum())
    if n == 0:
        return np.zeros(3), np.zeros(3), 0
    sel = lab[tissue]
    return sel.mean(axis=0), sel.std(axis=0), n


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
        pixels, n_tiles = sample_pixels(tiles, max_tiles)
        mean, std, n = self._stats(pixels)
        return {
            "method": self.name,
            "version": PARAMS_VERSION,
            "lab_mean": json_floats(mean),
            "lab_std": json_floats(std),
            "target_lab_mean": list(self.mean),
            "target_lab_std": list(self.std),
            "background_ramp": list(self.background_ramp),
            "tissue_max_lightness": float(self.tissue_max_lightness),
            "n_tiles": n_tiles,
            "n_pixels": len(pixels),
            "n_tissue_pixels": n,
        }

    def fit_target(self, image: TileInput) -> ReinhardNormalizer:
        pixels, _ = sample_pixels(image, max_tiles=1 << 30)
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
        check_method(params, self.name)
        batch = as_rgb_batch(tiles)
        lut, weights = self._luts(params)
        w_lut = weights.reshape(256, 1)
        flat = batch.reshape(-1, 3)
        out = np.empty_like(flat)
        chunk = stain_common.CHUNK_PIXELS  # module attribute: tests monkeypatch it
        for s in range(0, len(flat), chunk):
            x = flat[s : s + chunk].reshape(-1, 1, 3)
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
            out[s : s + chunk] = acc
        return out.reshape(batch.shape)


def derive_reinhard_reference(n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Recompute REINHARD_REFERENCE_MEAN/STD from the Macenko reference (see the constants)."""
    u = (np.arange(n) + 0.5) / n
    q = -np.log1p(-u) / math.log(100.0)  # exponential quantiles, 99th percentile -> 1
    c_h, c_e = np.meshgrid(
        q * MACENKO_REFERENCE_MAX_CONCENTRATIONS[0], q * MACENKO_REFERENCE_MAX_CONCENTRATIONS[1]
    )
    od = np.stack([c_h.ravel(), c_e.ravel()], axis=1) @ np.asarray(MACENKO_REFERENCE_STAINS)
    rgb = np.clip(np.floor(I0 * np.exp(-od) + 0.5), 0, 255).astype(np.uint8)
    mean, std, _ = _lab_stats(rgb, REINHARD_TISSUE_MAX_LIGHTNESS)
    return mean, std
