"""``abmil``: gated-attention MIL (Ilse, Tomczak & Welling 2018), ours (STAMP 2.5 has none).

Each tile ``x_k`` is embedded ``h_k = Dropout(ReLU(W x_k))`` (``dim_hidden``); its attention score
is ``a_k ∝ exp(wᵀ (tanh(V h_k) ⊙ sigmoid(U h_k)))`` with an attention width of ``dim_hidden // 2``
(Ilse et al.'s 500/128 ratio, rounded); the bag embedding ``z = Σ a_k h_k`` (valid tiles only)
goes through Dropout and a linear head. Everything is O(N) in the bag size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stamp.modeling.models.attention import rowwise
from stamp.modeling.models.pooling import as_bag


class GatedAttentionMIL(nn.Module):
    """``forward(feats (B, N, D), coords (ignored), mask (B, N) True = pad) -> (B, n_outputs)``."""

    def __init__(
        self, dim_input: int, n_outputs: int, *, dim_hidden: int = 256, dropout: float = 0.25
    ) -> None:
        super().__init__()
        dim_attention = max(1, dim_hidden // 2)
        self.embed = nn.Sequential(nn.Linear(dim_input, dim_hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(dim_hidden, dim_attention)
        self.attention_u = nn.Linear(dim_hidden, dim_attention)
        self.attention_w = nn.Linear(dim_attention, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim_hidden, n_outputs))

    def _score(self, h: Tensor) -> Tensor:
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gate).squeeze(-1)

    def _embed_and_weigh(self, feats: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        h = rowwise(self.embed, as_bag(feats))
        scores = rowwise(lambda t: self._score(t).unsqueeze(-1), h).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(mask.bool(), float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a bag without valid tiles: all 0
        return h, weights

    def forward(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h, weights = self._embed_and_weigh(feats, mask)
        return self.head(torch.einsum("bn,bnd->bd", weights, h))

    def attention(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Gated-attention weights ``(B, N)``; they sum to 1 over each bag's valid tiles."""
        return self._embed_and_weigh(feats, mask)[1]
