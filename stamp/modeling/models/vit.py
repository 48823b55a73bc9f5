"""``vit``: STAMP's transformer MIL over a bag of tile features (the default tile-level model).

Architecture (re-derived from STAMP's description, Dosovitskiy et al. 2021 and Vaswani et al.
2017): ``Linear(d_in → dim_model), GELU, Dropout``; a learnable class token is prepended;
``n_layers`` pre-LayerNorm blocks (multi-head self-attention + residual, then ``LayerNorm, Linear,
GELU, Dropout, Linear, Dropout`` + residual); a final LayerNorm; a linear head on the class token.
There is no positional encoding unless ``use_alibi`` adds a tile-distance bias (``alibi.py``).

Dropout as in STAMP: the configured ``dropout`` after the projection and on the attention
weights; the feed-forward dropout is fixed at :data:`FF_DROPOUT` = 0.5 whatever ``dropout`` says
(at STAMP's default ``dropout`` of 0.0 it is the only dropout). Dropout has no parameters:
checkpoints are unaffected. It does not stop the model memorising a small cohort's training bags
(issue #15: 60-patient cohort, training loss below 0.01 by epoch ~10 with it too;
``bench/bench_modeling_defaults.py``).

Differences from STAMP 2.5, on purpose:

* the padding mask is honoured (STAMP drops it for memory), so a padded bag gives the same
  output as the bag without padding;
* the last block computes its output for the class token only (the other tokens' outputs of the
  last block are never used), and attention is exact but memory-bounded (``attention.py``): a
  200,000-tile bag runs on CPU in a few GiB (STAMP issue #78: out of memory at ~20k tiles).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stamp.modeling.models.alibi import AlibiBias
from stamp.modeling.models.attention import BiasFn, PreNormBlock, rowwise

FF_DROPOUT = 0.5
"""Feed-forward dropout of every block, hard-wired as in STAMP (not the configured ``dropout``)."""


class VisionTransformer(nn.Module):
    """Transformer MIL; ``forward(feats (B, N, D), coords (B, N, 2) µm, mask (B, N) True = pad)``."""

    def __init__(
        self,
        dim_input: int,
        n_outputs: int,
        *,
        dim_model: int = 512,
        dim_feedforward: int = 512,
        n_heads: int = 8,
        n_layers: int = 2,
        dropout: float = 0.0,
        use_alibi: bool = False,
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim_input, dim_model), nn.GELU(), nn.Dropout(dropout))
        self.class_token = nn.Parameter(torch.randn(dim_model))
        self.blocks = nn.ModuleList(
            PreNormBlock(
                dim_model, n_heads, dim_feedforward, dropout, activation="gelu", ff_dropout=FF_DROPOUT
            )
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim_model)
        self.head = nn.Linear(dim_model, n_outputs)
        self.alibi = AlibiBias(n_heads) if use_alibi else None

    def _tokens(
        self, feats: Tensor, coords: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None, BiasFn | None]:
        b = feats.shape[0]
        x = rowwise(self.project, feats)
        x = torch.cat([self.class_token.to(x.dtype).expand(b, 1, -1), x], dim=1)
        full_mask = None
        if mask is not None:
            full_mask = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=mask.device), mask.bool()], 1)
        bias_fn = None
        if self.alibi is not None:
            if coords is None:
                raise ValueError("vit with use_alibi needs tile coordinates")
            bias_fn = self.alibi.bias_fn(coords.to(x.dtype), mask)
        return x, full_mask, bias_fn

    def _encode(
        self, feats: Tensor, coords: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None, BiasFn | None]:
        """All blocks but the last on all tokens; returns (tokens, full mask, bias_fn)."""
        x, full_mask, bias_fn = self._tokens(feats, coords, mask)
        for block in self.blocks[:-1]:
            x = block(x, key_padding_mask=full_mask, bias_fn=bias_fn)
        return x, full_mask, bias_fn

    def forward(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x, full_mask, bias_fn = self._encode(feats, coords, mask)
        cls = self.blocks[-1](x, key_padding_mask=full_mask, bias_fn=bias_fn, cls_only=True)
        return self.head(self.norm(cls[:, 0]))

    def attention(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Last block's class-token attention over the tiles, averaged over heads: ``(B, N)``.

        The class token's weight on itself is left out and each head renormalised over the tiles,
        so the weights of a bag's valid tiles sum to 1 (padding gets 0).
        """
        x, full_mask, bias_fn = self._encode(feats, coords, mask)
        last = self.blocks[-1]
        assert isinstance(last, PreNormBlock)
        h = rowwise(last.norm_attn, x)
        bias = None if bias_fn is None else bias_fn(0, 1)
        tile_mask = torch.zeros_like(h[..., 0], dtype=torch.bool) if full_mask is None else full_mask.clone()
        tile_mask[:, 0] = True  # drop the class token as a key
        w = last.attn.weights(h[:, :1], h, key_padding_mask=tile_mask, bias=bias)
        return w[:, :, 0, 1:].mean(dim=1)
