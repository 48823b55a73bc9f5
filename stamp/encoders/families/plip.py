"""PLIP: CLIP ViT-B/32 fine-tuned on pathology image-text pairs; ``get_image_features``, 512-d.

Built with transformers (``CLIPVisionModelWithProjection`` from PLIP's CLIP config:
the image tower and its projection, without the text tower), loaded from the
released ``pytorch_model.bin`` (its ``vision_model.*`` and ``visual_projection.*``
keys). Needs the ``plip`` extra (transformers). The vendor-free equivalent used by
the tests is timm's CLIP ViT-B/32 plus a bias-free 768->512 projection.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from stamp.encoders.errors import MissingExtraError
from stamp.encoders.registry import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
    Family,
    InputSpec,
    WeightsSource,
    register,
)

_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    projection_dim=512,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


@functools.cache
def _wrapper_class():
    from torch import nn

    class ClipImageFeatures(nn.Module):
        def __init__(self, clip) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, x):
            return self.clip(pixel_values=x).image_embeds

    return ClipImageFeatures


def build(spec: EncoderSpec):
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except ImportError:
        raise MissingExtraError(spec.name, spec.extra or "plip", "transformers") from None
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**_CONFIG))
    return _wrapper_class()(clip).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from stamp.encoders.loading import load_strict, read_trusted

    (path,) = files.values()
    sd = read_trusted(path)
    keep = ("vision_model.", "visual_projection.")
    sd = {k: v for k, v in sd.items() if k.startswith(keep) and not k.endswith("position_ids")}
    load_strict(model.clip, sd, f"encoder {spec.name!r} ({path})")


def build_equivalent(spec: EncoderSpec):
    import timm
    from torch import nn

    vit = timm.create_model("vit_base_patch32_clip_224", pretrained=False, num_classes=0)
    return nn.Sequential(vit, nn.Linear(768, 512, bias=False)).eval()


register(
    EncoderSpec(
        name="plip",
        family="plip",
        builder="transformers",
        hf_class="CLIPVisionModelWithProjection",
        dim=512,
        n_params=87_849_216,
        params_note="CLIP ViT-B/32 image tower + projection, ~88M",
        input=InputSpec(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, interpolation="bicubic"),
        tile_px=224,
        mpp=0.5,
        precision="fp32",
        weights=WeightsSource(
            hf_repo="vinid/plip",
            revision="67ade53ddd32195868f422585f72698ef5d15094",
            files={"pytorch_model.bin": "98a7f8d2a1f4a8fc8f6dedb3a16ff7efbe02a7ef67c93904c80bca9767c69630"},
            digest_source="public registries (raw2features registry.yaml and project notes), not re-verified here",
        ),
        license="MIT (declared in the project's setup.py)",
        gated=False,
        extra="plip",
        notes="get_image_features (projected, not L2-normalised) like STAMP",
    ),
    Family(build=build, load_weights=load_weights, build_equivalent=build_equivalent),
)
