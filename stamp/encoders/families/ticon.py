"""TICON on H-optimus-1: each tile's H-optimus-1 embedding passed through TICON's contextualiser.

As in STAMP, a tile is encoded alone (a one-token "slide" at relative position (0, 0)),
so TICON acts as a learned per-tile refinement. Only TICON's encoder path for
H-optimus-1 inputs is built: the input projection ``input_proj_hoptimus1`` (Linear,
SiLU, Linear, LayerNorm), 6 pre-norm blocks (attention with a distance bias of
per-head ALiBi slopes x Euclidean distance between tile positions, SwiGLU MLP 1536 ->
8192 -> 1536, learned residual gains) and the final ``enc_norm`` -> 1536-d. Parameter
names mirror the checkpoint's ``backbone.*`` keys; the decoder and the other
tile-encoder projections in the checkpoint are not used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from stamp.encoders.registry import (
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    EncoderSpec,
    Family,
    InputSpec,
    WeightsSource,
    get_spec,
    register,
)

_DIM, _HEADS, _DEPTH, _KEY = 1536, 24, 6, "hoptimus1"


def alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes; for a head count that is not a power of two, interleave the next power's."""

    def pow2(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** math.floor(math.log2(n))
    return pow2(p) + alibi_slopes(2 * p)[0::2][: n - p]


@functools.cache
def _classes():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.proj = nn.Linear(dim, dim)
            self.register_buffer(
                "slopes", torch.tensor(alibi_slopes(heads)).view(1, heads, 1, 1), persistent=False
            )

        def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
            b, n, d = x.shape
            split = lambda z: z.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
            slopes = cast(torch.Tensor, self.slopes)  # the buffer registered in __init__
            bias = -slopes.to(x.dtype) * torch.cdist(coords, coords)[:, None].to(x.dtype)
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.proj(out.transpose(1, 2).reshape(b, n, d))

    class SwiGLU(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            hidden = int(dim * 16 / 3)
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden // 2, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, g = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(nn.functional.silu(a) * g)

    class Residual(nn.Module):
        def __init__(self, dim: int, fn: nn.Module) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(dim, eps=1e-5)
            self.fn = fn
            self.gamma = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
            return x + self.gamma * self.fn(self.norm(x), **kw)

    class Block(nn.Module):
        def __init__(self, dim: int, heads: int) -> None:
            super().__init__()
            self.residual1 = Residual(dim, Attention(dim, heads))
            self.residual2 = Residual(dim, SwiGLU(dim))

        def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
            return self.residual2(self.residual1(x, coords=coords))

    class Blocks(nn.Module):
        def __init__(self, dim: int, heads: int, depth: int) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    class Projection(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.fc1, self.fc2, self.norm = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.fc2(nn.functional.silu(self.fc1(x))))

    class TiconEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_proj_dict = nn.ModuleDict({f"input_proj_{_KEY}": Projection(_DIM)})
            self.encoder = Blocks(_DIM, _HEADS, _DEPTH)
            self.enc_norm = nn.LayerNorm(_DIM, eps=1e-5)

        def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
            x = self.input_proj_dict[f"input_proj_{_KEY}"](x)
            for blk in self.encoder.blocks:
                x = blk(x, coords)
            return self.enc_norm(x)

    class HOptimusTicon(nn.Module):
        def __init__(self, tile_encoder: nn.Module) -> None:
            super().__init__()
            self.tile_encoder = tile_encoder
            self.ticon = TiconEncoder()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            emb = self.tile_encoder(x).unsqueeze(1)  # (N, 1, 1536): each tile is its own slide
            coords = torch.zeros(emb.shape[0], 1, 2, device=emb.device, dtype=torch.float32)
            return self.ticon(emb, coords).squeeze(1)

    return HOptimusTicon


def build(spec: EncoderSpec):
    from stamp.encoders.families.timm_vit import build as build_vit

    return _classes()(build_vit(get_spec("h-optimus-1"))).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from stamp.encoders.families.timm_vit import load_weights as load_vit
    from stamp.encoders.loading import load_strict, read_trusted

    tile = {k.split("/", 1)[1]: p for k, p in files.items() if k.startswith("h-optimus-1/")}
    load_vit(model.tile_encoder, tile, get_spec("h-optimus-1"))
    path = files["backbone/checkpoint.pth"]
    sd = read_trusted(path)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    ours = set(model.ticon.state_dict())
    load_strict(model.ticon, {k: v for k, v in sd.items() if k in ours}, f"encoder {spec.name!r} ({path})")


register(
    EncoderSpec(
        name="ticon",
        family="ticon",
        builder="native",
        timm_arch="vit_giant_patch14_reg4_dinov2 (H-optimus-1) + TICON encoder",
        components=("h-optimus-1",),
        dim=_DIM,
        n_params=1_309_521_920,
        params_note="H-optimus-1 (~1.1B) + TICON encoder path (6 blocks + input projection, ~175M)",
        input=InputSpec(224, None, HOPTIMUS_MEAN, HOPTIMUS_STD, interpolation="bilinear"),
        tile_px=224,
        mpp=0.5,
        precision="fp16",
        weights=WeightsSource(hf_repo="varunb/TICON", revision=None, files={"backbone/checkpoint.pth": None}),
        license="unknown (see the varunb/TICON card); H-optimus-1 is CC-BY-NC-ND-4.0",
        gated=True,
        notes="needs the h-optimus-1 weights too; single tile at relative position (0, 0) like STAMP",
    ),
    Family(build=build, load_weights=load_weights),
)
