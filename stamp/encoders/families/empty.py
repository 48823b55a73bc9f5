"""``empty``: STAMP's 0-dimensional extractor (used only to fill the tile cache)."""

from __future__ import annotations

import functools

from stamp.encoders.registry import EncoderSpec, Family, InputSpec, register


@functools.cache
def _empty_class():
    from torch import nn

    class Empty(nn.Module):
        def forward(self, x):
            return x.new_zeros((x.shape[0], 0))

    return Empty


def build(spec: EncoderSpec):
    return _empty_class()().eval()


register(
    EncoderSpec(
        name="empty",
        family="empty",
        builder="native",
        dim=0,
        n_params=0,
        input=InputSpec(None, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        tile_px=224,
        mpp=None,
        precision="fp32",
        weights=None,
        license="-",
        gated=False,
        notes="0-dim features, like STAMP: only populates the tile cache",
    ),
    Family(build=build),
)
