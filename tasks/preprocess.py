"""Prefect task for one slide of ``preprocess`` (DESIGN contract 4 cache key).

Key = slide content sha256 + the parameters that change features (tiling, tissue, stain,
reader, mpp fallback, extractor) + encoder weights digest + preprocessing code version.
The output path is not part of the key: a moved slide or output folder hits the cache and
the flow places the cached outputs at the new path. A hit is served only after the outputs'
own provenance is checked (:func:`stamp.preprocessing.check_slide_outputs`). Failures raise (so
they are never cached).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect import task

from stamp.encoders import Encoder, load_encoder
from stamp.hashing import shared_index
from stamp.preprocessing import PreprocessParams, preprocessing_code_hash, process_slide
from stamp.slides import TilingParams
from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import RESULT_OPTIONS

PREPROCESS_CODE_VERSION = preprocessing_code_hash()
PREPROCESS_CACHE = content_cache_policy(
    PREPROCESS_CODE_VERSION, content_args=("slide_path",), ignore_args=("h5_path", "run")
)

_ENCODERS: dict[tuple[str, str | None, str], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(extractor: str, weights_dir: str | None, device: str) -> Encoder:
    """The encoder for this process, loaded once; every weight file must match a pinned sha256."""
    key = (extractor, weights_dir, device)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = load_encoder(extractor, weights_dir=weights_dir, device=device, strict=True)
        return _ENCODERS[key]


def params_from(cache_params: dict[str, Any], run: dict[str, Any]) -> PreprocessParams:
    """Rebuild :class:`PreprocessParams` from the task's JSON-friendly arguments."""
    tiling = TilingParams(**cache_params["tiling"], max_workers=int(run.get("max_workers", 8)))
    return PreprocessParams(
        extractor=cache_params["extractor"],
        tiling=tiling,
        reader=cache_params["reader"],
        default_slide_mpp=cache_params["default_slide_mpp"],
        stain_norm=cache_params["stain_norm"],
        batch_size=int(run.get("batch_size", 64)),
    )


@task(name="preprocess-slide", cache_policy=PREPROCESS_CACHE, **RESULT_OPTIONS)
def preprocess_slide(
    slide_path: str, h5_path: str, params: dict[str, Any], weights_sha256: str, run: dict[str, Any]
) -> dict[str, Any]:
    """Extract one slide's features to ``h5_path`` (or reuse them); return its report (a dict).

    ``params`` are :meth:`PreprocessParams.cache_params` (part of the cache key), ``run``
    holds what does not change outputs: weights_dir, device, batch_size, max_workers.
    """
    encoder = get_encoder(params["extractor"], run.get("weights_dir"), run.get("device", "cpu"))
    if encoder.weights_sha256 != weights_sha256:
        raise RuntimeError(f"encoder weights changed during the run ({params['extractor']}); run again")
    report = process_slide(
        Path(slide_path),
        Path(h5_path),
        params_from(params, run),
        encoder,
        slide_sha256=shared_index().sha256(slide_path),
        code=PREPROCESS_CODE_VERSION,
    )
    return report.as_dict()
