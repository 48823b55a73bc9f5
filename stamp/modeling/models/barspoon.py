"""``barspoon``: encoder–decoder transformer for multi-target classification (one query per target).

Tiles: ``Linear(d_in → d_model), ReLU``, plus (``positional_encoding``) a 2-D sinusoidal encoding
of the tile coordinates (µm): ``d_model/4`` frequencies ``ω_i = 100000^(-i/(d_model/4))`` per axis,
``[sin(xω), cos(xω), sin(yω), cos(yω)]``. A pre-LayerNorm transformer encoder
(``num_encoder_layers`` blocks: self-attention, ReLU feed-forward of ``dim_feedforward``) and a final
LayerNorm give the memory. A pre-LayerNorm decoder (``num_decoder_layers`` blocks: self-attention
among the target queries, cross-attention to the tiles, feed-forward) runs one learned query token
per target; a final LayerNorm and one linear head per target give that target's logits.

Dropout is 0.1 (PyTorch's transformer default; the STAMP config has no key for it). The final
encoder LayerNorm is ours (pre-LN layers otherwise hand the decoder un-normalised memory).
Attention is exact and memory-bounded as in ``vit`` (``attention.py``); the padding mask is
honoured in the encoder and in the cross-attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stamp.modeling.models.attention import FeedForward, MultiHeadAttention, PreNormBlock, rowwise
from stamp.modeling.models.pooling import as_bag


def sinusoidal_2d(coords: Tensor, dim: int, base: float = 100000.0) -> Tensor:
    """``(B, N, dim)`` 2-D sinusoidal encoding of ``coords`` (B, N, 2); zero-padded if 4 ∤ dim."""
    n_freq = dim // 4
    out = coords.new_zeros(*coords.shape[:2], dim)
    if n_freq == 0:
        return out
    omega = base ** (-torch.arange(n_freq, dtype=coords.dtype, device=coords.device) / n_freq)
    x = coords[..., :1] * omega
    y = coords[..., 1:2] * omega
    out[..., : 4 * n_freq] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
    return out


class DecoderBlock(nn.Module):
    """Pre-LN decoder block: queries self-attend, cross-attend to the tiles, then feed-forward."""

    def __init__(self, dim: int, n_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, n_heads, dropout)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, n_heads, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim_feedforward, dropout, activation="relu")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h))
        x = x + self.drop(self.cross_attn(self.norm_cross(x), memory, key_padding_mask=memory_mask))
        return x + self.ff(self.norm_ff(x))


class Barspoon(nn.Module):
    """``forward(feats, coords, mask) -> [logits (B, n_classes_t) for each target t]``."""

    def __init__(
        self,
        dim_input: int,
        n_outputs: Sequence[int],
        *,
        d_model: int = 512,
        num_encoder_heads: int = 8,
        num_decoder_heads: int = 8,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        dim_feedforward: int = 2048,
        positional_encoding: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_outputs = [int(n) for n in n_outputs]
        if not self.n_outputs:
            raise ValueError("barspoon needs at least one target")
        self.d_model = d_model
        self.positional_encoding = positional_encoding
        self.project = nn.Sequential(nn.Linear(dim_input, d_model), nn.ReLU())
        self.encoder = nn.ModuleList(
            PreNormBlock(
                d_model,
                num_encoder_heads,
                dim_feedforward,
                dropout,
                activation="relu",
                residual_dropout=dropout,
            )
            for _ in range(num_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        self.queries = nn.Parameter(torch.randn(len(self.n_outputs), d_model))
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, num_decoder_heads, dim_feedforward, dropout)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList(nn.Linear(d_model, n) for n in self.n_outputs)

    def forward(
        self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None
    ) -> list[Tensor]:
        feats = as_bag(feats)
        x = rowwise(self.project, feats)
        if self.positional_encoding:
            if coords is None:
                raise ValueError("barspoon with positional_encoding needs tile coordinates")
            x = x + rowwise(lambda c: sinusoidal_2d(c, self.d_model), coords.to(x.dtype))
        pad = None if mask is None else mask.bool()
        for block in self.encoder:
            x = block(x, key_padding_mask=pad)
        memory = rowwise(self.encoder_norm, x)
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        for dblock in self.decoder:
            q = dblock(q, memory, pad)
        q = self.decoder_norm(q)
        return [head(q[:, t]) for t, head in enumerate(self.heads)]

    def attention(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError("barspoon has no single per-tile attention map")
