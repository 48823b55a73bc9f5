"""MIL and embedding models, one module per family, and the registry that builds them.

Every model is an ``nn.Module`` with ``forward(feats (B, N, D), coords (B, N, 2) µm, mask (B, N)
True = padding | None)`` returning ``(B, n_outputs)`` logits (``barspoon``: a list, one tensor per
target) and ``attention(feats, coords, mask) -> (B, N)`` where the model has per-tile attention
(``vit``, ``abmil``; the others raise ``NotImplementedError``).
"""

from stamp.modeling.models.registry import MODEL_NAMES, build_model, default_model_name, supports

__all__ = ["MODEL_NAMES", "build_model", "default_model_name", "supports"]
