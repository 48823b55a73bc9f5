"""Exact multi-head attention with memory bounded in the bag size, and the pre-LayerNorm block.

Why this exists: a deployment bag can hold 200,000 tiles; a plain ``softmax(QKᵀ)V`` would need
N² scores per head (200k² × 4 B ≈ 160 GB). The strategy, all exact (no approximation):

* **No additive bias** (plain ViT, barspoon): one call of
  :func:`torch.nn.functional.scaled_dot_product_attention` with the padding mask given as a
  *broadcast* boolean ``(B, 1, 1, N)`` mask. PyTorch's CPU kernel for this is a blockwise
  (flash-style) one, O(N) extra memory (measured: 20,000 tokens need ~45 MB above q/k/v); on CUDA
  the memory-efficient kernel accepts the same mask. Queries are still fed in slices of
  ``NO_BIAS_QUERY_CHUNK`` rows so that a backend that falls back to the math kernel stays bounded.
* **Additive bias** (ALiBi distances): the bias cannot be broadcast over heads, so it is
  materialised **per query slice only**: the slice length is chosen so that ``B·H·slice·N`` stays
  under ``SCORE_BUDGET`` elements (≈256 MB of float32). Softmax is per query row, so slicing the
  queries against *all* keys is exact, no running log-sum-exp is needed.
* Row-wise parts (LayerNorm, feed-forward) run over token slices of ``ROW_CHUNK`` rows, so the
  feed-forward hidden layer never exists for all tokens at once.

Bounded memory needs ``torch.no_grad()`` / ``torch.inference_mode()`` (autograd would keep every
slice for the backward pass); training bags are small (``bag_size``), so this is never an issue.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BiasFn = Callable[[int, int], Tensor]
"""``bias_fn(start, stop)`` → additive attention bias for query rows ``start:stop``, shaped
``(B, H or 1, stop - start, N_keys)``; ``-inf`` where a key must be ignored."""

SCORE_BUDGET = 2**26  # elements of a materialised (B, H, q-slice, N) bias / score block
NO_BIAS_QUERY_CHUNK = 4096
ROW_CHUNK = 16384


def query_chunk_size(batch: int, heads: int, n_queries: int, n_keys: int, budget: int | None = None) -> int:
    """Rows per query slice so that a ``(batch, heads, slice, n_keys)`` block fits in ``budget``."""
    budget = SCORE_BUDGET if budget is None else budget
    return max(1, min(n_queries, budget // max(1, batch * heads * n_keys)))


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    bias_fn: BiasFn | None = None,
    dropout_p: float = 0.0,
    query_chunk: int | None = None,
) -> Tensor:
    """``softmax(q kᵀ / √d + bias) v`` with q ``(B, H, Nq, d)``, k/v ``(B, H, Nk, d)``.

    ``key_padding_mask`` is ``(B, Nk)`` with True = padding (ignored as key). Without ``bias_fn``
    the mask goes to SDPA as a broadcast boolean mask; with it, the bias (and the padding as
    ``-inf``) is built per query slice. ``query_chunk`` forces the slice length (tests).
    """
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    if bias_fn is None:
        step = query_chunk or NO_BIAS_QUERY_CHUNK
        if n_q <= step:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        outs = [
            F.scaled_dot_product_attention(
                q[:, :, s : s + step], k, v, attn_mask=allowed, dropout_p=dropout_p
            )
            for s in range(0, n_q, step)
        ]
        return torch.cat(outs, dim=2)
    step = query_chunk or query_chunk_size(batch, heads, n_q, n_k)
    outs = []
    for s in range(0, n_q, step):
        e = min(s + step, n_q)
        bias = bias_fn(s, e).to(q.dtype)
        if key_padding_mask is not None:
            bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k, v, attn_mask=bias, dropout_p=dropout_p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attention_weights(
    q: Tensor, k: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | None = None
) -> Tensor:
    """Explicit ``softmax(q kᵀ / √d + bias)`` (B, H, Nq, Nk); for few queries only (e.g. the CLS)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def rowwise(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None = None) -> Tensor:
    """Apply a token-wise ``fn`` to ``x`` (B, N, ·) in token slices (same result, bounded memory)."""
    chunk = ROW_CHUNK if chunk is None else chunk
    if x.shape[1] <= chunk:
        return fn(x)
    return torch.cat([fn(x[:, s : s + chunk]) for s in range(0, x.shape[1], chunk)], dim=1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (one fused q/k/v projection with bias, output projection).

    Parameter count ``4·d² + 4·d``, as :class:`torch.nn.MultiheadAttention`. Queries may be a subset
    of the key tokens (or another sequence: cross-attention); k/v are projected from ``x_kv``.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"model dimension {dim} is not divisible by the number of heads {n_heads}")
        self.dim, self.n_heads, self.dropout = dim, n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.dim // self.n_heads).transpose(1, 2)

    def project(self, x_q: Tensor, x_kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q ``(B, H, Nq, d_h)``, k and v ``(B, H, Nk, d_h)``."""
        w, b = self.qkv.weight, self.qkv.bias
        d = self.dim
        q = F.linear(x_q, w[:d], b[:d])
        k = rowwise(lambda t: F.linear(t, w[d : 2 * d], b[d : 2 * d]), x_kv)
        v = rowwise(lambda t: F.linear(t, w[2 * d :], b[2 * d :]), x_kv)
        return self._split(q), self._split(k), self._split(v)

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        bias_fn: BiasFn | None = None,
    ) -> Tensor:
        q, k, v = self.project(x_q, x_kv)
        o = chunked_attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            bias_fn=bias_fn,
            dropout_p=self.dropout if self.training else 0.0,
        )
        b, _, n, _ = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, self.dim))

    def weights(
        self, x_q: Tensor, x_kv: Tensor, *, key_padding_mask: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Attention probabilities ``(B, H, Nq, Nk)`` (explicit; use with few queries)."""
        q, k, _ = self.project(x_q, x_kv)
        return attention_weights(q, k, key_padding_mask=key_padding_mask, bias=bias)


class FeedForward(nn.Sequential):
    """``Linear, activation, Dropout, Linear, Dropout`` (the transformer MLP)."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str = "gelu") -> None:
        act: nn.Module = nn.GELU() if activation == "gelu" else nn.ReLU()
        super().__init__(
            nn.Linear(dim, hidden), act, nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )


class PreNormBlock(nn.Module):
    """``x + Drop(MHSA(LN(x)))``, then ``x + FF(LN(x))`` (pre-LayerNorm transformer block).

    ``dropout`` is used on the attention weights and, unless ``ff_dropout`` is given, in the
    feed-forward part. ``cls_only=True`` computes the block's output for the first token only (its
    keys/values still come from all tokens): the last ViT block needs nothing else, which halves
    deploy time.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        dim_feedforward: int,
        dropout: float,
        *,
        activation: str = "gelu",
        residual_dropout: float = 0.0,
        ff_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, dropout)
        self.drop = nn.Dropout(residual_dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim_feedforward, dropout if ff_dropout is None else ff_dropout, activation)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        bias_fn: BiasFn | None = None,
        cls_only: bool = False,
    ) -> Tensor:
        h = rowwise(self.norm_attn, x)
        h_q = h[:, :1] if cls_only else h
        x_q = x[:, :1] if cls_only else x
        y = x_q + self.drop(self.attn(h_q, h, key_padding_mask=key_padding_mask, bias_fn=bias_fn))
        return rowwise(lambda t: t + self.ff(self.norm_ff(t)), y)
