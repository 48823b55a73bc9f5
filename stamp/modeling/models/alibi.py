"""ALiBi-style distance bias for tile attention (Press et al. 2022, applied to 2-D tile positions).

Head ``h`` adds ``-s_h · dist(i, j) / D̄`` to the attention logit of query tile ``i`` and key tile
``j``: ``dist`` is the Euclidean distance of the tile coordinates (µm), ``D̄`` a running mean of the
pairwise tile distance seen in training (a scale-free unit, so 224 µm and 256 µm tiles behave the
same) and ``s_h`` a learnable per-head scale initialised with ALiBi's geometric slopes
``2^(-8h/H)``. The class token (index 0) gets no bias to or from anything (STAMP places it at
coordinate (0, 0), which would make its bias depend on where the slide sits; we do not).

``D̄`` is updated in training as a cumulative (Welford) mean over training batches of the mean
pairwise distance between a bag's valid tiles; before any update (an untrained model) each bag
uses its own mean. The bias is only ever built for a slice of query rows (see ``attention.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stamp.modeling.models.attention import BiasFn

_PAIR_BUDGET = 2**23  # distances per row slice in mean_pairwise_distance (64 MB of float64)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's geometric per-head slopes ``2^(-8h/H)``, h = 1..H."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    # the direct formula: cdist's matmul variant loses metres of precision at µm coordinates
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def mean_pairwise_distance(coords: Tensor, mask: Tensor | None) -> Tensor:
    """Per bag mean distance between distinct valid tiles, ``(B,)``; 1 where fewer than 2 tiles.

    Computed in row slices, so memory is O(slice × N) for any bag size.
    """
    coords = coords.double()
    valid = torch.ones(coords.shape[:2], dtype=torch.bool, device=coords.device) if mask is None else ~mask
    total = torch.zeros(coords.shape[0], dtype=torch.float64, device=coords.device)
    step = max(1, _PAIR_BUDGET // max(1, coords.shape[0] * coords.shape[1]))
    for s in range(0, coords.shape[1], step):
        d = _pairwise(coords[:, s : s + step], coords)
        d.masked_fill_(~(valid[:, s : s + step, None] & valid[:, None, :]), 0.0)
        total += d.sum(dim=(1, 2))
    n = valid.sum(dim=1).double()
    pairs = n * (n - 1)
    return torch.where(pairs > 0, total / pairs.clamp(min=1), torch.ones_like(total)).float()


class AlibiBias(nn.Module):
    """Learnable per-head distance scales plus the running distance unit (buffers)."""

    mean_distance: Tensor
    n_updates: Tensor

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(alibi_slopes(n_heads))
        self.register_buffer("mean_distance", torch.tensor(0.0))
        self.register_buffer("n_updates", torch.tensor(0, dtype=torch.long))

    def distance_unit(self, coords: Tensor, mask: Tensor | None) -> Tensor:
        """``(B,)`` distance unit for this batch; updates the running mean in training."""
        if self.training:
            with torch.no_grad():
                batch_mean = mean_pairwise_distance(coords, mask).mean()
                self.n_updates += 1
                self.mean_distance += (batch_mean - self.mean_distance) / self.n_updates
        if int(self.n_updates) > 0:
            return self.mean_distance.clamp(min=1e-6).expand(coords.shape[0])
        return mean_pairwise_distance(coords, mask).clamp(min=1e-6)

    def bias_fn(self, coords: Tensor, mask: Tensor | None) -> BiasFn:
        """Bias builder for a token sequence ``[CLS, tile_1..tile_N]`` given tile ``coords`` (B, N, 2)."""
        unit = self.distance_unit(coords, mask).to(coords.dtype)
        # CLS gets an arbitrary position; its row and column are zeroed below.
        full = torch.cat([coords[:, :1], coords], dim=1) / unit[:, None, None]
        scale = self.scale.view(1, -1, 1, 1)

        def fn(start: int, stop: int) -> Tensor:
            d = _pairwise(full[:, start:stop], full)
            d[:, :, 0] = 0.0
            if start == 0:
                d[:, 0, :] = 0.0
            return -scale * d.unsqueeze(1)

        return fn
