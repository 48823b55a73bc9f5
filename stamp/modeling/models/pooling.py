"""Small helpers shared by the bag models: masked mean pooling and input-shape checks."""

from __future__ import annotations

from torch import Tensor


def as_bag(feats: Tensor) -> Tensor:
    """``(B, N, D)`` view of ``feats``; a 2-D ``(B, D)`` input (slide/patient embedding) is a 1-tile bag."""
    if feats.dim() == 2:
        return feats.unsqueeze(1)
    if feats.dim() != 3:
        raise ValueError(f"expected features shaped (B, N, D) or (B, D), got {tuple(feats.shape)}")
    return feats


def masked_mean(feats: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the valid tiles of each bag, ``(B, D)`` (an empty bag gives zeros)."""
    if mask is None:
        return feats.mean(dim=1)
    keep = (~mask.bool()).unsqueeze(-1).to(feats.dtype)
    return (feats * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
