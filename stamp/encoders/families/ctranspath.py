"""CTransPath and CHIEF-CTransPath: Swin-T with a convolutional patch-embedding stem.

The network is timm's ``SwinTransformer`` (Swin-T: embed 96, depths 2-2-6-2, heads
3-6-12-24, window 7) whose 4x4 patch embedding is replaced by :class:`ConvStem`:
two stride-2 3x3 convs (3 -> 12 -> 24 channels, BatchNorm + ReLU, no bias) and a 1x1
conv to 96 channels, then the patch LayerNorm. Output: mean of the final tokens, 768-d.

The released checkpoints follow the pre-0.9 timm layout (downsampling at the end of
a stage, persisted attention masks / position indices); timm's Swin checkpoint filter
converts them, so they load strictly into the current timm model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from stamp.encoders.registry import EncoderSpec, Family, InputSpec, Precision, WeightsSource, register


@functools.cache
def _convstem_class():
    import torch
    from torch import nn

    class ConvStem(nn.Module):
        """CTransPath's stem; NHWC output, like timm's PatchEmbed(output_fmt="NHWC")."""

        def __init__(
            self,
            img_size=224,
            patch_size=4,
            in_chans=3,
            embed_dim=96,
            norm_layer=None,
            strict_img_size=True,
            output_fmt="NHWC",
            **_: object,
        ) -> None:
            super().__init__()
            if patch_size != 4 or embed_dim % 8:
                raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size = size
            self.patch_size = (4, 4)
            self.grid_size = (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.strict_img_size = strict_img_size
            c1, c2 = embed_dim // 8, embed_dim // 4
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c1),
                nn.ReLU(inplace=True),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c2),
                nn.ReLU(inplace=True),
                nn.Conv2d(c2, embed_dim, 1),
            )
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
                raise ValueError(
                    f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}"
                )
            return self.norm(self.proj(x).permute(0, 2, 3, 1))

    return ConvStem


def build(spec: EncoderSpec):
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, embed_layer=_convstem_class()
    ).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from timm.models.swin_transformer import checkpoint_filter_fn

    from stamp.encoders.loading import load_strict, read_trusted

    (path,) = files.values()
    sd = read_trusted(path)
    sd = sd.get("model", sd)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # STAMP loads with head = Identity
    load_strict(model, checkpoint_filter_fn(sd, model), f"encoder {spec.name!r} ({path})")


FAMILY = Family(build=build, load_weights=load_weights)


class _CommonFields(TypedDict):
    """The :class:`EncoderSpec` fields both CTransPath variants share."""

    family: str
    builder: str
    timm_arch: str
    dim: int
    n_params: int
    params_note: str
    tile_px: int
    mpp: float
    precision: Precision
    license: str
    gated: bool


_COMMON = _CommonFields(
    family="ctranspath",
    builder="native",
    timm_arch="swin_tiny_patch4_window7_224",
    dim=768,
    n_params=27_520_038,
    params_note="Swin-T + ConvStem, ~27.5M (CTransPath paper: 28M)",
    tile_px=224,
    mpp=1.0,
    precision="fp32",
    license="GPL-3.0 (authors: non-commercial academic use)",
    gated=False,
)

register(
    EncoderSpec(
        name="ctranspath",
        input=InputSpec(224, 224, interpolation="bilinear"),
        weights=WeightsSource(
            url="gdrive:1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX",
            files={"ctranspath.pth": "7c998680060c8743551a412583fac689db43cec07053b72dfec6dcd810113539"},
            digest_source="STAMP (src/stamp/preprocessing/extractor/ctranspath.py)",
            legacy_cache="ctranspath.pth",
        ),
        notes="authors recommend 1.0 um/px (10x) downstream; pretrained at 20x",
        **_COMMON,
    ),
    FAMILY,
)

register(
    EncoderSpec(
        name="chief-ctranspath",
        input=InputSpec(224, None, interpolation="bilinear"),
        weights=WeightsSource(
            url="gdrive:1_vgRF1QXa8sPCOpJ1S9BihwZhXQMOVJc",
            files={
                "chief_ctranspath.pth": "1646f23001214f74cf432ef0e80b808ee6605143802ae6ed53a87564ddc4924a"
            },
            digest_source="STAMP (src/stamp/preprocessing/extractor/chief_ctranspath.py)",
            legacy_cache="chief_ctranspath.pth",
        ),
        notes="CHIEF's CTransPath; the tile features the chief/eagle slide encoders need",
        **_COMMON,
    ),
    FAMILY,
)
