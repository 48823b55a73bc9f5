"""CONCH (v1) image tower, rebuilt natively: no vendor package needed.

CONCH is a CoCa model; STAMP uses ``encode_image(proj_contrast=False,
normalize=False)``, i.e. only this path of the vision tower:

* ``trunk``: timm ``VisionTransformer`` ViT-B/16 at 448 px (embed 768, 12 blocks,
  12 heads, MLP x4, no head, dynamic image size), all tokens after the final norm;
* ``attn_pool_contrast``: one learned 512-d query attending over the tokens with
  ``nn.MultiheadAttention(512, 8 heads, kdim=vdim=768)``, LayerNorm on the query
  (512) and on the tokens (768);
* ``ln_contrast``: LayerNorm(512) of the pooled query -> 512-d feature.

Parameter names mirror the checkpoint's ``visual.*`` keys, so the released
``pytorch_model.bin`` loads strictly (the text tower and caption pooler are skipped).
tests/test_encoders_vendor.py checks it against the vendor package (``conch-fork``)
when that is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from stamp.encoders.registry import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EncoderSpec,
    Family,
    InputSpec,
    WeightsSource,
    register,
)

#: checkpoint key prefixes used by encode_image(proj_contrast=False)
_USED = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.")


@functools.cache
def _classes():
    import torch
    from torch import nn

    class AttentionalPooler(nn.Module):
        def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(n_queries, d_model))
            self.attn = nn.MultiheadAttention(
                d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
            )
            self.ln_q = nn.LayerNorm(d_model)
            self.ln_k = nn.LayerNorm(context_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k = self.ln_k(x)
            q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
            return self.attn(q, k, k, need_weights=False)[0]

    class ConchVision(nn.Module):
        def __init__(self, img_size: int = 448, embed_dim: int = 512) -> None:
            super().__init__()
            from timm.models.vision_transformer import VisionTransformer

            self.trunk = VisionTransformer(
                img_size=img_size,
                patch_size=16,
                embed_dim=768,
                depth=12,
                num_heads=12,
                mlp_ratio=4,
                num_classes=0,
                dynamic_img_size=True,
            )
            self.attn_pool_contrast = AttentionalPooler(embed_dim, 768, n_head=8, n_queries=1)
            self.ln_contrast = nn.LayerNorm(embed_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.trunk.forward_features(x)
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    return ConchVision


def build(spec: EncoderSpec):
    return _classes()(img_size=448, embed_dim=512).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from timm.layers import resample_abs_pos_embed

    from stamp.encoders.loading import load_strict, read_trusted

    (path,) = files.values()
    sd = read_trusted(path)
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith(_USED)}
    pe = sd.get("trunk.pos_embed")
    if pe is not None and pe.shape != model.trunk.pos_embed.shape:  # as CONCH's own loader does
        sd["trunk.pos_embed"] = resample_abs_pos_embed(
            pe,
            new_size=list(model.trunk.patch_embed.grid_size),
            num_prefix_tokens=1,
            interpolation="bilinear",
            antialias=False,
        )
    load_strict(model, sd, f"encoder {spec.name!r} ({path})")


register(
    EncoderSpec(
        name="conch",
        family="conch",
        builder="native",
        timm_arch="vit_base_patch16_224 (trunk) + attentional pooler",
        dim=512,
        n_params=87_567_104,
        params_note="ViT-B/16 at 448 px + contrastive attentional pooler (the image path used; CONCH's full "
        "CoCa incl. text tower is ~395M)",
        input=InputSpec(448, 448, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, interpolation="bicubic"),
        tile_px=448,
        mpp=0.5,
        precision="fp32",
        weights=WeightsSource(
            hf_repo="MahmoodLab/CONCH",
            revision="f9ca9f877171a28ade80228fb195ac5d79003357",
            files={"pytorch_model.bin": "40a9644b9ba0e83a74576e0a5e5f7313599fa9c9cdaf3c20f8a3e271b0e9ae7c"},
            digest_source="public registries and project notes (file size 802,235,437 B), not re-verified here",
        ),
        license="CC-BY-NC-ND-4.0",
        gated=True,
        notes="encode_image(proj_contrast=False, normalize=False) like STAMP; image tower only (no vendor package)",
    ),
    Family(build=build, load_weights=load_weights),
)
