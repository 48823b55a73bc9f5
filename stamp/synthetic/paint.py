"""Paint level-0 tiles of a synthetic slide from its region scores and texture atlases.

A tile is classified from the scores of the mask cells around it (bilinear
interpolation never leaves their min/max): pure background tiles are one of a
few cached near-white noise tiles; tissue tiles multiply two atlas crops and
blend towards glass by a slide-level staining-intensity field (non-periodic,
so the atlas period does not show as a lattice); only tiles on a tissue or
planted edge need extra per-pixel weights. All arithmetic is OpenCV on uint8
tiles, so a tile costs ~0.1-0.4 ms and memory holds one tile per layer.
"""

from __future__ import annotations

import cv2
import numpy as np

from stamp.synthetic.regions import PLANTED_EDGE_PX, TISSUE_EDGE_PX, SlideFields
from stamp.synthetic.texture import Atlases, glass_rgb

N_BACKGROUND_VARIANTS = 4


class TilePainter:
    """Renders tile ``(ty, tx)`` of level 0 on demand; deterministic for a given ``rng`` state.

    ``edge_px`` / ``planted_edge_px``: width in level-0 px of the soft tissue and
    planted-region borders.
    """

    def __init__(
        self,
        fields: SlideFields,
        atlases: Atlases,
        tile: int,
        rng: np.random.Generator,
        mpp: float,
        edge_px: float = TISSUE_EDGE_PX,
        planted_edge_px: float = PLANTED_EDGE_PX,
    ) -> None:
        d = fields.downsample
        if tile % d:
            raise ValueError(f"tile size {tile} must be a multiple of the mask downsample {d}")
        if tile > atlases.pad:
            raise ValueError(f"tile size {tile} exceeds the atlas padding {atlases.pad}")
        self.tile, self.d, self.k = tile, d, tile // d
        self.t_pad = np.pad(fields.tissue_score, 1, mode="edge")
        # slide-level (non-periodic) staining intensity: 1 = full stain, lower = paler towards glass
        # (loose stroma, uneven staining) on ~40 µm and ~150 µm scales. It carries all the
        # low-frequency variation, so the atlas period does not show as a lattice.
        shape = fields.tissue_score.shape
        mod = np.full(shape, 0.88, np.float32)
        for scale_um, amp in ((40.0, 0.06), (150.0, 0.05)):
            white = rng.standard_normal(shape, dtype=np.float32)
            f = cv2.GaussianBlur(white, (0, 0), max(0.7, scale_um / (mpp * d)), borderType=cv2.BORDER_REFLECT)
            mod += amp * f / max(float(f.std()), 1e-12)
        self.m_pad = np.pad(np.clip(mod, 0.72, 1.0), 1, mode="edge")
        self.p_pad = np.pad(fields.planted_score, 1, mode="edge")
        self.gain_t = d / edge_px
        self.gain_p = d / planted_edge_px
        self.layers = (atlases.eosin, atlases.nuclei, atlases.biomarker)
        self.periods = atlases.periods
        self.offsets = [(int(rng.integers(0, p)), int(rng.integers(0, p))) for p in self.periods]
        # per-slide stain variation: a mild per-channel gamma
        gamma = rng.uniform(0.92, 1.08, 3)
        ramp = np.arange(256, dtype=np.float64) / 255.0
        lut = np.stack([255.0 * ramp**g for g in gamma], axis=1)
        self.lut = np.clip(lut + 0.5, 0, 255).astype(np.uint8).reshape(256, 1, 3)
        glass = glass_rgb()
        self.background = [
            cv2.LUT(
                np.clip(glass + rng.normal(0.0, 1.2, (tile, tile, 3)) + 0.5, 0, 255).astype(np.uint8),
                self.lut,
            )
            for _ in range(N_BACKGROUND_VARIANTS)
        ]
        self._bg_rng_key = int(rng.integers(0, 2**31))

    def background_index(self, ty: int, tx: int) -> int:
        """Which cached background variant tile ``(ty, tx)`` uses (a fixed hash)."""
        return (ty * 73_856_093 ^ tx * 19_349_663 ^ self._bg_rng_key) % N_BACKGROUND_VARIANTS

    def _crop(self, layer: int, ty: int, tx: int) -> np.ndarray:
        period = self.periods[layer]
        ox, oy = self.offsets[layer]
        y = (ty * self.tile + oy) % period
        x = (tx * self.tile + ox) % period
        return self.layers[layer][y : y + self.tile, x : x + self.tile]

    def _upsample(self, crop: np.ndarray) -> np.ndarray:
        """Bilinear upsampling of a cell crop (with a 1-cell margin) to the tile, seamless across tiles."""
        k, d = self.k, self.d
        up = cv2.resize(crop, ((k + 2) * d, (k + 2) * d), interpolation=cv2.INTER_LINEAR)
        return up[d : d + self.tile, d : d + self.tile]

    def _alpha(self, crop: np.ndarray, gain: float) -> np.ndarray:
        return np.clip(self._upsample(crop) * gain + 0.5, 0.0, 1.0)

    def paint(self, ty: int, tx: int) -> np.ndarray | int:
        """The RGB uint8 tile ``(ty, tx)``, or an int: the index of a cached background tile."""
        k = self.k
        tc = self.t_pad[ty * k : ty * k + k + 2, tx * k : tx * k + k + 2]
        thr_t = 0.5 / self.gain_t
        if tc.max() <= -thr_t:
            return self.background_index(ty, tx)
        pc = self.p_pad[ty * k : ty * k + k + 2, tx * k : tx * k + k + 2]
        thr_p = 0.5 / self.gain_p
        nuclei = self._crop(1, ty, tx)
        if pc.max() > -thr_p:
            bio = self._crop(2, ty, tx)
            if pc.min() >= thr_p:
                nuclei = bio
            else:
                a = self._alpha(pc, self.gain_p)
                nuclei = cv2.blendLinear(bio, nuclei, a, 1.0 - a)
        out = cv2.LUT(cv2.multiply(self._crop(0, ty, tx), nuclei, scale=1.0 / 255.0), self.lut)
        w = self._upsample(self.m_pad[ty * k : ty * k + k + 2, tx * k : tx * k + k + 2])
        if tc.min() < thr_t:
            w *= self._alpha(tc, self.gain_t)
        return cv2.blendLinear(out, self.background[self.background_index(ty, tx)], w, 1.0 - w)
