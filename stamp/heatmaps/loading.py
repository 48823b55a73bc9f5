"""Loading for the heatmaps: the model (once per process and checkpoint) and the checks that a
slide's features can be explained per tile by it (one-line :class:`HeatmapError` otherwise)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from stamp.features import Features
from stamp.heatmaps.jobs import HeatmapError, HeatmapJob
from stamp.heatmaps.relevance import Head
from stamp.modeling.checkpoint import CheckpointError, load_checkpoint
from stamp.slides import SlideReader, resolve_mpp
from stamp.slides.mpp import MPPError

__all__ = ["cached_model", "check_features", "check_fit", "slide_mpp"]

# --------------------------------------------------------------------------- model cache

_MODELS: OrderedDict[tuple[Any, ...], tuple[nn.Module, dict[str, Any], Head]] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_MODELS_KEEP = 2


def cached_model(checkpoint_path: Path | str, device: str) -> tuple[nn.Module, dict[str, Any], Head]:
    """The checkpoint's model (eval, no parameter gradients), meta and head; loaded once per process."""
    path = Path(checkpoint_path)
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: checkpoint not found") from exc
    # the file's identity, as the digest memo keys it: a rewrite keeping size and mtime changes ctime
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, device)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        model, meta = load_checkpoint(path, map_location=device)
        model.requires_grad_(False)
        entry = (model, meta, Head.from_meta(meta))
        _MODELS[key] = entry
        while len(_MODELS) > _MODELS_KEEP:
            _MODELS.popitem(last=False)
        return entry


# --------------------------------------------------------------------------- checks


def check_features(job: HeatmapJob, feats: Features, meta: dict[str, Any]) -> str:
    """Raise for features this model cannot explain per tile; return a note for the result."""
    level = str(meta.get("feature_type") or "tile")
    where = job.feature_path
    if feats.feat_type != "tile":
        raise HeatmapError(
            job.slide_path,
            f"{where} holds a {feats.feat_type}-level embedding; heatmaps need tile features "
            "(set heatmaps.feature_dir to the tile features written by preprocess)",
        )
    if feats.layout == "no-coords" or feats.tile_size_um is None or feats.coords_um is None:
        raise HeatmapError(job.slide_path, f"{where} has no tile coordinates/tile size; re-run preprocess")
    if len(feats.feats) == 0:
        raise HeatmapError(job.slide_path, f"{where} holds no tiles")
    dim, want = int(feats.feats.shape[1]), int(meta["dim_input"])
    if level == "tile":
        if dim != want:
            raise HeatmapError(
                job.slide_path,
                f"{where} has {dim}-dim features but the model takes {want}; use the features of the "
                f"extractor it was trained on ({meta.get('extractor')})",
            )
        ours, theirs = feats.extractor, meta.get("extractor")
        if ours and theirs and str(ours) != str(theirs):
            raise HeatmapError(
                job.slide_path,
                f"{where} comes from extractor {ours} but the model was trained on {theirs} features",
            )
        return ""
    if dim != want:
        raise HeatmapError(
            job.slide_path,
            f"the model takes {level}-level embeddings of {want} dims; per-tile heatmaps need tile "
            f"features of that dimension (their mean stands for the embedding) but {where} has {dim}",
        )
    return f"{level}-level model: each tile's gradient x input share of the mean tile embedding"


def check_fit(
    job: HeatmapJob, coords_um: np.ndarray, dims: tuple[int, int], mpp: float, tile_um: float
) -> None:
    extent = np.array(dims, dtype=np.float64) * mpp
    far = coords_um.max(axis=0) if len(coords_um) else np.zeros(2)
    if np.any(far > extent + tile_um) or np.any(coords_um.min(axis=0) < -tile_um):
        raise HeatmapError(
            job.slide_path,
            f"tiles of {job.feature_path} reach ({far[0]:.0f}, {far[1]:.0f}) µm but the slide is "
            f"{extent[0]:.0f} x {extent[1]:.0f} µm at {mpp:g} µm/px; the features belong to another slide "
            "or another mpp (check default_slide_mpp)",
        )


def slide_mpp(reader: SlideReader, feats: Features, default_slide_mpp: float | None) -> tuple[float, str]:
    """Level-0 µm/px to place the tiles: the ``slide_mpp`` preprocessing recorded in the h5 (the
    coordinates were made with it), else the slide's metadata, else ``default_slide_mpp``."""
    recorded = feats.attrs.get("slide_mpp")
    try:
        value = float(recorded) if recorded is not None else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if np.isfinite(value) and value > 0:
        return value, "h5 slide_mpp"
    try:
        return resolve_mpp(reader, default_slide_mpp)
    except MPPError as exc:
        raise MPPError(
            reader.path,
            "no microns-per-pixel (MPP) in the slide metadata or its features; "
            "set heatmaps.default_slide_mpp",
        ) from exc
