"""CONCH v1.5 (``conch1_5``), the tile encoder bundled with TITAN, via its remote code.

STAMP loads ``AutoModel.from_pretrained("MahmoodLab/TITAN", trust_remote_code=True)``
and calls ``return_conch()``. We do the same from a local snapshot of the TITAN repo
(``<weights_dir>/conch1_5/`` or the HF cache snapshot), with ``local_files_only=True``.
Because this runs the repo's Python code, every file (code, ``config.json``, weights)
must have a pinned sha256 in the weights lock (the built-in lock leaves the code files
null, so ``conch1_5`` is refused until they are pinned with ``python -m stamp.encoders pin``),
and the code is loaded from a private copy of the verified bytes (``Family.remote_code``,
:func:`stamp.encoders.weights.verified_private_copy`). Needs the ``titan`` extra
(transformers, einops, einops-exts).

The shape-equivalent build used by the tests follows the published architecture:
ViT-L/16 trunk at 448 px (LayerScale), one-query attentional pooler (768-d, 8 heads,
bias-free projections) and a final LayerNorm -> 768-d.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from stamp.encoders.errors import MissingExtraError
from stamp.encoders.registry import EncoderSpec, Family, InputSpec, WeightsSource, register

_CODE_FILES = (
    "config.json",
    "configuration_titan.py",
    "modeling_titan.py",
    "vision_transformer.py",
    "text_transformer.py",
    "conch_tokenizer.py",
    "conch_v1_5.py",
)


def _require_vendor(spec: EncoderSpec) -> None:
    for mod in ("transformers", "einops", "einops_exts"):
        try:
            __import__(mod)
        except ImportError:
            raise MissingExtraError(spec.name, spec.extra or "titan", mod) from None


def build(spec: EncoderSpec):
    _require_vendor(spec)
    raise RuntimeError(
        f"encoder {spec.name!r}: the architecture ships with its weights (TITAN remote code); "
        "use load_encoder, or build_architecture(..., equivalent=True) for shapes"
    )


def load(spec: EncoderSpec, files: Mapping[str, Path]):
    _require_vendor(spec)
    from transformers import AutoModel

    # load_encoder passes a private copy of the verified files (Family.remote_code): one folder
    folders = {p.parent for p in files.values()}
    if len(folders) != 1:
        raise ValueError(
            f"encoder {spec.name!r}: all TITAN files must be in one folder, found {sorted(folders)}"
        )
    (folder,) = folders
    titan = AutoModel.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    model, _transform = titan.return_conch()
    return model.eval()


@functools.cache
def _equivalent_class():
    import torch
    from torch import nn

    class Pooler(nn.Module):
        def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8) -> None:
            super().__init__()
            self.heads = n_head
            self.query = nn.Parameter(torch.randn(1, d_model))
            self.ln_k = nn.LayerNorm(context_dim)
            self.ln_q = nn.LayerNorm(d_model)
            self.to_q = nn.Linear(d_model, d_model, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
            self.to_out = nn.Linear(d_model, d_model, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, _ = x.shape
            q = self.to_q(self.ln_q(self.query)).expand(n, -1, -1)
            k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
            split = lambda z: z.reshape(n, z.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
            return self.to_out(out.transpose(1, 2).reshape(n, 1, -1))

    class ConchV15Equivalent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from timm.models.vision_transformer import VisionTransformer

            self.trunk = VisionTransformer(
                img_size=448,
                patch_size=16,
                embed_dim=1024,
                depth=24,
                num_heads=16,
                init_values=1.0,
                num_classes=0,
                dynamic_img_size=True,
            )
            self.attn_pool_contrast = Pooler()
            self.ln_contrast = nn.LayerNorm(768)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])

    return ConchV15Equivalent


def build_equivalent(spec: EncoderSpec):
    return _equivalent_class()().eval()


register(
    EncoderSpec(
        name="conch1_5",
        family="titan",
        builder="vendor",
        vendor_package="transformers AutoModel(MahmoodLab/TITAN, trust_remote_code).return_conch()",
        hf_class="AutoModel",
        dim=768,
        n_params=306_711_296,
        params_note="shape-equivalent ViT-L/16 at 448 px + attentional pooler (TITAN paper: CONCH v1.5, ViT-L)",
        input=InputSpec(448, 448, interpolation="bilinear"),
        tile_px=512,
        mpp=0.5,
        precision="fp16",
        weights=WeightsSource(
            hf_repo="MahmoodLab/TITAN",
            revision="dac6773d9961cfc75503440676ff157a2c6e8d2e",
            files={
                "conch_v1_5_pytorch_model.bin": "09daf1912a016512e084636f9c76eee7c42f5c1f09b0461bb76082a3e0fecfa5",
                "model.safetensors": "4e92128317dca5c9e47d8173467105c21e4095f88d3bde9077e7f1e784b195fe",
                **dict.fromkeys(_CODE_FILES),
            },
            digest_source="one public registry (raw2features registry.yaml), not re-verified here; "
            "the remote-code files are unverified",
        ),
        license="CC-BY-NC-ND-4.0",
        gated=True,
        extra="titan",
        notes="TITAN's eval transform (resize 448 bilinear, crop 448, ImageNet); the card extracts 512 px at 20x",
    ),
    Family(build=build, load=load, build_equivalent=build_equivalent, remote_code=True),
)
