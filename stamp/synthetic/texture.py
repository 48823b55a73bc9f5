"""Periodic H&E-like texture atlases for synthetic slides.

Tissue is composed by Beer-Lambert stain mixing: every layer is an RGB
*transmittance* image (uint8, 255 = clear glass) and layers combine by
multiplication, ``out = a * b / 255``. Three periodic (toroidal) layers are
rendered once per ``(texture_seed, mpp)`` and cached:

* ``eosin``: glass white times pink eosin with wavy fibres whose orientation
  drifts, and pixel noise (period 2048 px);
* ``nuclei``: sparse hematoxylin nuclei of normal stroma (elongated fibroblast
  nuclei aligned with the fibres, some round ones) (period 1792 px);
* ``biomarker``: the planted texture: dense clusters of small, round, dark
  blue-purple nuclei in a purple haze (lymphocyte-like; period 1536 px).

The different periods make the stroma repeat only every lcm(2048, 1792) =
14,336 px. Sizes are physical (µm), so the texture is scale-correct at any mpp.
Each atlas is stored padded by one tile (wrap mode), so a tile-sized crop at
any offset is a contiguous slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# Stain optical-density vectors (typical Macenko estimates for H&E), RGB.
_H_OD = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_E_OD = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
_GLASS = np.array([244.0, 242.0, 246.0], dtype=np.float32)  # background light level

PERIOD_EOSIN = 2048
PERIOD_NUCLEI = 1792
PERIOD_BIOMARKER = 1536


@dataclass(frozen=True)
class Atlases:
    """Cached texture layers; each array is ``(P + pad, P + pad, 3)`` uint8, periodic in ``P``."""

    eosin: np.ndarray
    nuclei: np.ndarray
    biomarker: np.ndarray
    pad: int

    @property
    def periods(self) -> tuple[int, int, int]:
        """Periods of (eosin, nuclei, biomarker) in pixels."""
        return tuple(a.shape[0] - self.pad for a in (self.eosin, self.nuclei, self.biomarker))  # type: ignore[return-value]


def glass_rgb() -> np.ndarray:
    """The background (glass) colour as float32 RGB."""
    return _GLASS.copy()


def periodic_noise(
    rng: np.random.Generator,
    size: int,
    sigma: float,
    sigma_perp: float | None = None,
    angle: float = 0.0,
    white: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian-filtered white noise on a ``size``² torus, zero mean and unit std (float32).

    ``sigma`` is the filter width in px; with ``sigma_perp`` the filter is
    anisotropic (long along ``angle`` radians), which gives fibre-like streaks.
    Pass ``white`` to filter a given noise field instead of drawing one.
    """
    if white is None:
        white = rng.standard_normal((size, size), dtype=np.float32)
    spec = np.fft.rfft2(white)
    ky = np.fft.fftfreq(size).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    if sigma_perp is None:
        k2 = (sigma**2) * (kx**2 + ky**2)
    else:
        kpar = kx * math.cos(angle) + ky * math.sin(angle)
        kperp = -kx * math.sin(angle) + ky * math.cos(angle)
        k2 = (sigma**2) * kpar**2 + (sigma_perp**2) * kperp**2
    out = np.fft.irfft2(spec * np.exp(-2.0 * math.pi**2 * k2), s=(size, size)).astype(np.float32)
    out -= out.mean()
    out /= max(float(out.std()), 1e-12)
    return out


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Like :func:`periodic_noise` (isotropic) but computed on a coarser grid when ``sigma`` is large.

    The field is made at ``size / f`` with ``f`` a power of two <= sigma / 3 and
    upsampled with wrap padding, so it stays periodic; cost falls by ``f**2``.
    """
    f = 1
    while f * 2 <= min(sigma / 3.0, 32) and size % (f * 2) == 0:
        f *= 2
    if f == 1:
        return periodic_noise(rng, size, sigma)
    small = periodic_noise(rng, size // f, sigma / f)
    padded = np.pad(small, 2, mode="wrap")
    big = cv2.resize(padded, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    out = big[2 * f : 2 * f + size, 2 * f : 2 * f + size]
    return np.ascontiguousarray(out / max(float(out.std()), 1e-12))


def _wrap_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur that respects periodicity (pad by wrap, blur, crop)."""
    m = max(1, int(3 * sigma + 1))
    padded = np.pad(img, ((m, m), (m, m)) + ((0, 0),) * (img.ndim - 2), mode="wrap")
    return cv2.GaussianBlur(padded, (0, 0), sigma)[m:-m, m:-m]


def _draw_wrapped(
    canvas: np.ndarray, centers: np.ndarray, axes: np.ndarray, angles: np.ndarray, values: np.ndarray
) -> None:
    """Draw filled anti-aliased ellipses on a periodic uint8 canvas (copies across the seams)."""
    size = canvas.shape[0]
    shift = 4  # sub-pixel precision bits for cv2 drawing
    scale = 1 << shift
    for (cx, cy), (a, b), ang, val in zip(centers, axes, angles, values, strict=True):
        reach = a + 2
        xs = [0] + ([size] if cx < reach else []) + ([-size] if cx > size - reach else [])
        ys = [0] + ([size] if cy < reach else []) + ([-size] if cy > size - reach else [])
        for dx in xs:
            for dy in ys:
                cv2.ellipse(
                    canvas,
                    (round((cx + dx) * scale), round((cy + dy) * scale)),
                    (max(1, round(a * scale)), max(1, round(b * scale))),
                    float(ang),
                    0.0,
                    360.0,
                    int(val),
                    -1,
                    cv2.LINE_AA,
                    shift,
                )


_LUT_STEPS = 256  # concentration quantisation: 1/256 per step, range [0, 4)


def _to_transmittance(conc: np.ndarray, od: np.ndarray, light: np.ndarray | None = None) -> np.ndarray:
    """Stain concentration (HxW float32) -> RGB transmittance uint8 (optionally times ``light``).

    Uses a lookup table (exp per pixel is the slow part otherwise).
    """
    levels = np.arange(4 * _LUT_STEPS, dtype=np.float32) / _LUT_STEPS
    lut = np.exp(-levels[:, None] * od[None, :]) * (255.0 if light is None else light[None, :])
    lut = np.clip(lut + 0.5, 0, 255).astype(np.uint8)
    idx = np.clip(conc * _LUT_STEPS + 0.5, 0, 4 * _LUT_STEPS - 1).astype(np.uint16)
    return lut[idx]


def _pad_periodic(img: np.ndarray, pad: int) -> np.ndarray:
    return np.pad(img, ((0, pad), (0, pad), (0, 0)), mode="wrap")


def _warp_periodic(img: np.ndarray, rng: np.random.Generator, sigma: float, amplitude: float) -> np.ndarray:
    """Displace ``img`` by a smooth periodic random field (makes straight streaks wavy)."""
    size = img.shape[0]
    grid = np.arange(size, dtype=np.float32)
    map_x = grid[None, :] + amplitude * smooth_noise(rng, size, sigma)
    map_y = grid[:, None] + amplitude * smooth_noise(rng, size, sigma)
    return cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


_FIBRE_ANGLES = (0.0, math.pi / 3, 2 * math.pi / 3)


def _eosin_layer(rng: np.random.Generator, size: int, px_per_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Eosin transmittance (with glass light) and a coarse local fibre angle field (radians)."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    fibres = [
        periodic_noise(rng, size, 14 * px_per_um, 1.3 * px_per_um, angle=a, white=white)
        for a in _FIBRE_ANGLES
    ]
    # Smoothly varying orientation weights (soft-max of three slow fields).
    logits = np.stack([smooth_noise(rng, size, 60 * px_per_um) * 3.5 for _ in _FIBRE_ANGLES])
    logits -= logits.max(axis=0, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=0, keepdims=True)
    fib = w[0] * fibres[0] + w[1] * fibres[1] + w[2] * fibres[2]
    fib = _warp_periodic(fib, rng, 30 * px_per_um, 6 * px_per_um)
    fib = 1.0 / (1.0 + np.exp(-2.5 * (fib - 0.3)))  # bright wavy fibres
    step = 16
    coarse = w[:, ::step, ::step]
    angle_field = np.asarray(_FIBRE_ANGLES, dtype=np.float32)[np.argmax(coarse, axis=0)]
    # no low-frequency content here: it would show the period as a lattice at overview scale;
    # paler/denser areas come from the painter's non-periodic slide-level field instead
    fine = rng.standard_normal((size, size), dtype=np.float32)
    conc = (0.16 + 0.58 * fib) + 0.03 * fine
    conc = _wrap_blur(np.clip(conc, 0.02, None), 0.6 * max(px_per_um, 1.0))
    return _to_transmittance(conc, _E_OD, _GLASS), angle_field


def _nuclei_conc(
    rng: np.random.Generator,
    size: int,
    px_per_um: float,
    centers: np.ndarray,
    axes_um: np.ndarray,
    angles_deg: np.ndarray,
    strength: float,
) -> np.ndarray:
    """Hematoxylin concentration of a set of nuclei with chromatin texture (float32)."""
    canvas = np.zeros((size, size), np.uint8)
    values = rng.uniform(200, 255, len(centers))
    _draw_wrapped(canvas, centers, axes_um * px_per_um, angles_deg, values)
    chromatin = _wrap_blur(rng.standard_normal((size, size), dtype=np.float32), 0.5 * px_per_um)
    chromatin /= max(float(chromatin.std()), 1e-12)
    conc = canvas.astype(np.float32) * (strength / 255.0) * (0.85 + 0.15 * chromatin)
    return _wrap_blur(conc, 0.35 * px_per_um)


def _nuclei_layer(
    rng: np.random.Generator, size: int, px_per_um: float, angle_field: np.ndarray
) -> np.ndarray:
    """Sparse stroma nuclei: ~1 per 28x28 µm, 70 % elongated along the fibres."""
    area_um2 = (size / px_per_um) ** 2
    n = int(area_um2 / 800)
    centers = rng.uniform(0, size, (n, 2))
    elong = rng.random(n) < 0.7
    a = np.where(elong, rng.uniform(4.5, 7.0, n), rng.uniform(2.6, 3.6, n))
    b = np.where(elong, rng.uniform(1.3, 2.0, n), a * rng.uniform(0.8, 1.0, n))
    # the angle field is coarse and belongs to the eosin period: sample it proportionally
    ah, aw = angle_field.shape
    iy = (centers[:, 1] / size * ah).astype(int) % ah
    ix = (centers[:, 0] / size * aw).astype(int) % aw
    ang = np.degrees(angle_field[iy, ix]) + rng.normal(0, 12, n)
    conc = _nuclei_conc(rng, size, px_per_um, centers, np.stack([a, b], 1), ang, 1.3)
    return _to_transmittance(conc, _H_OD)


def _biomarker_layer(rng: np.random.Generator, size: int, px_per_um: float) -> np.ndarray:
    """Dense clusters of small round dark nuclei in a purple haze (the planted texture)."""
    area_um2 = (size / px_per_um) ** 2
    cluster = smooth_noise(rng, size, 15 * px_per_um)
    n_try = int(area_um2 * 0.8 / (math.pi * 3.1**2))
    cand = rng.uniform(0, size, (n_try, 2))
    p_keep = 1.0 / (1.0 + np.exp(-2.5 * (cluster[cand[:, 1].astype(int), cand[:, 0].astype(int)] + 1.2)))
    centers = cand[rng.random(n_try) < p_keep]
    n = len(centers)
    r = rng.uniform(2.6, 3.6, n)
    axes = np.stack([r, r * rng.uniform(0.85, 1.0, n)], 1)
    conc = _nuclei_conc(rng, size, px_per_um, centers, axes, rng.uniform(0, 180, n), 1.8)
    haze = 0.30 + 0.06 * np.clip(cluster, -1.5, 1.5)
    return _to_transmittance(conc + haze, _H_OD)


@lru_cache(maxsize=4)
def get_atlases(texture_seed: int, mpp: float, pad: int = 256) -> Atlases:
    """Render (or return cached) texture atlases for ``texture_seed`` at ``mpp`` µm/px.

    Deterministic in its arguments. Costs ~1 s the first time per key; about
    40 MB of memory per cached key.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(texture_seed), round(mpp * 1e4), 7_3_1]))
    px_per_um = 1.0 / mpp
    eosin, angle_field = _eosin_layer(rng, PERIOD_EOSIN, px_per_um)
    nuclei = _nuclei_layer(rng, PERIOD_NUCLEI, px_per_um, angle_field)
    biomarker = _biomarker_layer(rng, PERIOD_BIOMARKER, px_per_um)
    return Atlases(
        eosin=_pad_periodic(eosin, pad),
        nuclei=_pad_periodic(nuclei, pad),
        biomarker=_pad_periodic(biomarker, pad),
        pad=pad,
    )
