"""``trans_mil``: TransMIL (Shao et al., NeurIPS 2021) — Nyström attention + PPEG.

Per bag: ``Linear(d_in → dim_hidden), ReLU``; the tokens are made a square ``s × s`` grid
(``s = ⌈√N⌉``) by repeating the first tokens; a class token is prepended; then a Nyström
attention layer (pre-LayerNorm, residual), the PPEG position encoder (depthwise 7×7, 5×5 and 3×3
convolutions of the token grid plus identity), a second Nyström layer, LayerNorm and a linear
head on the class token.

Nyström attention (Xiong et al., AAAI 2021): ``softmax(QK̃ᵀ) · pinv(softmax(Q̃K̃ᵀ)) ·
softmax(Q̃Kᵀ) V`` with ``m = dim_hidden / 2`` landmarks Q̃, K̃ (means of m contiguous token
segments), the pseudo-inverse by 6 Newton–Schulz-type iterations, plus a depthwise convolution
(kernel 33 along the sequence) of V per head as a residual. Both outer softmax products are
computed with ``scaled_dot_product_attention`` (the left one with the small ``pinv · (…)V``
matrix as values), so memory stays O(N·d): a 200,000-tile bag fits easily.

Bags are processed one at a time over their valid (unpadded) tiles only, so padding never changes
the output and no mask has to enter the landmark means or the square grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stamp.modeling.models.pooling import as_bag


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Moore–Penrose pseudo-inverse of the (row-stochastic) matrices ``a`` (…, m, m), iteratively."""
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1, keepdim=True)
    row = abs_a.sum(dim=-1).amax(dim=-1, keepdim=True)
    z = a.transpose(-1, -2) / (col * row).unsqueeze(-1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Nyström self-attention for one bag ``(1, n, dim)``."""

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        conv_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim_hidden {dim} is not divisible by the number of heads {n_heads}")
        self.n_heads, self.dim = n_heads, dim
        self.n_landmarks = n_landmarks or max(1, dim // 2)
        self.pinv_iterations = pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = nn.Conv2d(
            n_heads, n_heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=n_heads, bias=False
        )

    def _landmarks(self, t: Tensor, m: int) -> Tensor:
        n = t.shape[2]
        segment = torch.arange(n, device=t.device) * m // n  # m contiguous, non-empty segments
        sums = torch.zeros(*t.shape[:2], m, t.shape[-1], dtype=t.dtype, device=t.device)
        sums.index_add_(2, segment, t)
        counts = torch.bincount(segment, minlength=m).to(t.dtype)
        return sums / counts[:, None]

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        h, dh = self.n_heads, self.dim // self.n_heads
        q, k, v = (t.view(b, n, h, dh).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        m = min(self.n_landmarks, n)
        q_l, k_l = self._landmarks(q, m), self._landmarks(k, m)
        kernel = torch.softmax(q_l @ k_l.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # (b, h, m, m)
        landmark_values = F.scaled_dot_product_attention(q_l, k, v)  # softmax(Q̃Kᵀ) V: (b, h, m, dh)
        mixed = iterative_pinv(kernel, self.pinv_iterations) @ landmark_values
        out = F.scaled_dot_product_attention(q, k_l, mixed)  # softmax(QK̃ᵀ) (…): (b, h, n, dh)
        out = out + self.residual(v)
        return self.out(out.transpose(1, 2).reshape(b, n, self.dim))


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise 7×7, 5×5, 3×3 convolutions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        b, _, d = x.shape
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, d, side, side)
        grid = grid + sum((conv(grid) for conv in self.convs), torch.zeros_like(grid))
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """``forward(feats (B, N, D), coords (ignored), mask (B, N) True = pad) -> (B, n_outputs)``."""

    def __init__(
        self, dim_input: int, n_outputs: int, *, dim_hidden: int = 512, n_heads: int = 8, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim_input, dim_hidden), nn.ReLU())
        self.class_token = nn.Parameter(torch.randn(1, 1, dim_hidden))
        self.norm1 = nn.LayerNorm(dim_hidden)
        self.attn1 = NystromAttention(dim_hidden, n_heads, dropout=dropout)
        self.ppeg = PPEG(dim_hidden)
        self.norm2 = nn.LayerNorm(dim_hidden)
        self.attn2 = NystromAttention(dim_hidden, n_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim_hidden)
        self.head = nn.Linear(dim_hidden, n_outputs)

    def _one_bag(self, feats: Tensor) -> Tensor:
        if feats.shape[0] == 0:  # a bag without valid tiles: one all-zero tile
            feats = feats.new_zeros(1, feats.shape[1])
        x = self.project(feats)
        n = x.shape[0]
        side = math.isqrt(n - 1) + 1
        extra = side * side - n
        if extra:
            x = torch.cat([x, x[torch.arange(extra, device=x.device) % n]])
        x = torch.cat([self.class_token.to(x.dtype), x.unsqueeze(0)], dim=1)
        x = x + self.attn1(self.norm1(x))
        x = self.ppeg(x, side)
        x = x + self.attn2(self.norm2(x))
        return self.head(self.norm(x[:, 0]))

    def forward(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        feats = as_bag(feats)
        outs = [
            self._one_bag(feats[i] if mask is None else feats[i][~mask[i].bool()])
            for i in range(feats.shape[0])
        ]
        return torch.cat(outs, dim=0)

    def attention(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError("trans_mil has no per-tile attention weights (Nyström attention)")
