"""``mlp`` and ``linear``: the slide/patient-level models (tile bags are mean-pooled first).

``mlp``: ``(num_layers − 1) × [Linear, ReLU, Dropout]`` then ``Linear`` to the outputs (STAMP's
defaults: dim_hidden 512, num_layers 2, dropout 0.25). ``linear``: one ``Linear``. For a tile bag
``(B, N, D)`` both first average the valid (unpadded) tiles; a slide/patient embedding arrives
as ``(B, 1, D)`` (or ``(B, D)``). Neither has per-tile attention.
"""

from __future__ import annotations

from torch import Tensor, nn

from stamp.modeling.models.pooling import as_bag, masked_mean


class _PooledModel(nn.Module):
    net: nn.Module

    def forward(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.net(masked_mean(as_bag(feats), mask))

    def attention(self, feats: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no per-tile attention")


class MLP(_PooledModel):
    """Multi-layer perceptron on the mean-pooled bag."""

    def __init__(
        self,
        dim_input: int,
        n_outputs: int,
        *,
        dim_hidden: int = 512,
        num_layers: int = 2,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim_input
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, dim_hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = dim_hidden
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)


class Linear(_PooledModel):
    """A single linear layer on the mean-pooled bag."""

    def __init__(self, dim_input: int, n_outputs: int) -> None:
        super().__init__()
        self.net = nn.Linear(dim_input, n_outputs)
