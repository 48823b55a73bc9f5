"""Which model serves which feature type and task, and building a model from its config block.

Support matrix (STAMP 2.5, with our ``abmil``):

=============  ====================  ===============================================
model          feature types         tasks
=============  ====================  ===============================================
``vit``        tile                  classification, regression, survival (single)
``trans_mil``  tile                  classification, regression, survival (single)
``abmil``      tile                  classification, regression, survival (single)
``mlp``        tile, slide, patient  classification, regression, survival (single)
``linear``     tile, slide, patient  classification, regression, survival (single)
``barspoon``   tile                  classification, multi-target only
=============  ====================  ===============================================

STAMP lets only ``mlp``/``linear`` train on slide/patient embeddings (its cross-validation only
``mlp``); we allow both everywhere. ``params`` is the model's ``advanced_config.model_params``
block as a mapping; keys the architecture does not use (``barspoon.learning_rate``, an optimiser
setting, and the barspoon keys STAMP's schema accepts under ``linear``) are ignored, any other
unknown key is an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from stamp.modeling.models.abmil import GatedAttentionMIL
from stamp.modeling.models.barspoon import Barspoon
from stamp.modeling.models.mlp import MLP, Linear
from stamp.modeling.models.trans_mil import TransMIL
from stamp.modeling.models.vit import VisionTransformer

MODEL_NAMES: tuple[str, ...] = ("vit", "trans_mil", "abmil", "mlp", "linear", "barspoon")
FEATURE_TYPES: tuple[str, ...] = ("tile", "slide", "patient")
TASKS: tuple[str, ...] = ("classification", "regression", "survival")

_CLASSES: dict[str, Callable[..., nn.Module]] = {
    "vit": VisionTransformer,
    "trans_mil": TransMIL,
    "abmil": GatedAttentionMIL,
    "mlp": MLP,
    "linear": Linear,
    "barspoon": Barspoon,
}
_BARSPOON_KEYS = frozenset(
    {
        "d_model",
        "num_encoder_heads",
        "num_decoder_heads",
        "num_encoder_layers",
        "num_decoder_layers",
        "dim_feedforward",
        "positional_encoding",
        "learning_rate",
    }
)
_IGNORED_KEYS: dict[str, frozenset[str]] = {
    "barspoon": frozenset({"learning_rate"}),
    "linear": _BARSPOON_KEYS,
}
_FEATURE_TYPES: dict[str, frozenset[str]] = {
    "mlp": frozenset(FEATURE_TYPES),
    "linear": frozenset(FEATURE_TYPES),
}


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


def supports(name: str, feature_type: str, task: str, multi_target: bool) -> bool:
    """Whether model ``name`` can be trained on ``feature_type`` features for ``task``."""
    _check_name(name)
    if feature_type not in _FEATURE_TYPES.get(name, frozenset({"tile"})) or task not in TASKS:
        return False
    if name == "barspoon":
        return multi_target and task == "classification"
    return not multi_target


def default_model_name(feature_type: str, multi_target: bool) -> str:
    """STAMP's choice when ``model_name`` is unset: ``vit`` (``barspoon`` if multi-target) for
    tiles, ``mlp`` for slide/patient embeddings."""
    if feature_type == "tile":
        return "barspoon" if multi_target else "vit"
    if feature_type in ("slide", "patient"):
        if multi_target:
            raise ValueError(f"multi-target training needs tile features, not {feature_type}-level ones")
        return "mlp"
    raise ValueError(f"unknown feature type {feature_type!r}; expected one of {', '.join(FEATURE_TYPES)}")


def model_kwargs(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``name`` taken from a config block (unused keys dropped)."""
    _check_name(name)
    signature = inspect.signature(_CLASSES[name])
    accepted = {p for p, v in signature.parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(params) - accepted - _IGNORED_KEYS.get(name, frozenset()))
    if unknown:
        raise ValueError(f"model_params.{name}: unknown key(s) {', '.join(unknown)}")
    return {k: v for k, v in params.items() if k in accepted}


def build_model(
    name: str, *, dim_input: int, n_outputs: int | list[int], params: Mapping[str, Any] | None = None
) -> nn.Module:
    """Model ``name`` for ``dim_input``-dimensional features and ``n_outputs`` outputs.

    ``n_outputs`` is an int (classes, or 1 for regression/survival) for single-target models and
    a list (classes per target) for ``barspoon``, which returns a list of per-target logits.
    """
    kwargs = model_kwargs(name, params or {})
    if name == "barspoon":
        outs = [n_outputs] if isinstance(n_outputs, int) else list(n_outputs)
        return Barspoon(int(dim_input), [int(n) for n in outs], **kwargs)
    if not isinstance(n_outputs, int):
        if len(n_outputs) != 1:
            raise ValueError(f"model {name!r} is single-target; got {len(n_outputs)} targets (use barspoon)")
        n_outputs = n_outputs[0]
    return _CLASSES[name](int(dim_input), int(n_outputs), **kwargs)
