"""What decides a slide's features: :class:`PreprocessParams` (from a config section) and the code version.

:meth:`PreprocessParams.cache_params` is the cache-key material and the ``settings`` of a slide's
provenance record; :func:`preprocessing_code_hash` is the code part of both. Part of
:mod:`stamp.preprocessing`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import stamp
from stamp.config_models import PreprocessingConfig
from stamp.hashing import code_hash
from stamp.slides import TilingParams

_PKG = Path(stamp.__file__).parent


def preprocessing_code_hash() -> str:
    """sha256 over the code that decides preprocessing outputs (slides, encoders, h5, this package)."""
    files = [*(_PKG / "slides").glob("*.py"), *(_PKG / "encoders").rglob("*.py")]  # families/ too
    files += [*(_PKG / "preprocessing").glob("*.py"), _PKG / "features.py"]
    return code_hash(files)


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that decides a slide's features, plus how to run (workers, batch, device)."""

    extractor: str
    tiling: TilingParams = field(default_factory=TilingParams)
    reader: str = "auto"
    default_slide_mpp: float | None = None
    stain_norm: str | None = None
    batch_size: int = 64

    def cache_params(self) -> dict[str, Any]:
        """The parameters that change outputs (cache key material; not workers/batch/device)."""
        tiling = {k: v for k, v in asdict(self.tiling).items() if k not in ("max_workers",)}
        return {
            "extractor": self.extractor,
            "tiling": tiling,
            "reader": self.reader,
            "default_slide_mpp": self.default_slide_mpp,
            "stain_norm": self.stain_norm,
        }

    def digest(self) -> str:
        """sha256 of :meth:`cache_params` (recorded as ``config_sha256`` in the h5)."""
        return hashlib.sha256(
            json.dumps(self.cache_params(), sort_keys=True, default=str).encode()
        ).hexdigest()


def params_from_config(cfg: PreprocessingConfig) -> PreprocessParams:
    """The preprocessing parameters a config section asks for."""
    tiling = TilingParams(
        tile_size_um=cfg.tile_size_um,
        tile_size_px=cfg.tile_size_px,
        brightness_cutoff=cfg.brightness_cutoff,
        canny_cutoff=cfg.canny_cutoff,
        tissue_method=cfg.tissue_method,
        min_tissue_fraction=cfg.min_tissue_fraction,
        max_workers=cfg.max_workers,
    )
    return PreprocessParams(
        extractor=cfg.extractor,
        tiling=tiling,
        reader=cfg.reader,
        default_slide_mpp=cfg.default_slide_mpp,
        stain_norm=cfg.stain_norm,
        batch_size=cfg.batch_size,
    )
