"""Tile encoders: a registry of STAMP's 19 extractors (+ ``empty`` and the weight-free ``demo``),
verified weight loading and batched feature extraction. One file per family in
:mod:`stamp.encoders.families` registers its encoders; the config accepts the registry's names.

Importing this package is cheap (no torch); :func:`load_encoder` and :class:`Encoder`
import torch on first use.

>>> from stamp.encoders import encoder_table, load_encoder
>>> print(encoder_table())  # doctest: +SKIP
>>> enc = load_encoder("uni", weights_dir="/weights")  # doctest: +SKIP
>>> feats = enc.encode(tiles_uint8)  # (N, 1024) float16  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stamp.encoders.errors import (
    EncoderError,
    MissingExtraError,
    OperatingPointWarning,
    UnknownEncoderError,
    WeightsDigestError,
    WeightsNotFoundError,
    WeightsOutsideRootError,
    WeightsUnverifiedError,
)
from stamp.encoders.registry import (
    ENCODERS,
    STAMP_ENCODER_NAMES,
    EncoderSpec,
    InputSpec,
    WeightsSource,
    build_architecture,
    check_operating_point,
    encoder_table,
    get_spec,
)

if TYPE_CHECKING:  # pragma: no cover
    from stamp.encoders.loading import Encoder, encoder_weights_digest, load_encoder

__all__ = [
    "ENCODERS",
    "STAMP_ENCODER_NAMES",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "InputSpec",
    "MissingExtraError",
    "OperatingPointWarning",
    "UnknownEncoderError",
    "WeightsDigestError",
    "WeightsNotFoundError",
    "WeightsOutsideRootError",
    "WeightsSource",
    "WeightsUnverifiedError",
    "build_architecture",
    "check_operating_point",
    "encoder_table",
    "encoder_weights_digest",
    "get_spec",
    "load_encoder",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import stamp.encoders` free of torch
    if name in ("Encoder", "load_encoder", "encoder_weights_digest"):
        from stamp.encoders import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'stamp.encoders' has no attribute {name!r}")
