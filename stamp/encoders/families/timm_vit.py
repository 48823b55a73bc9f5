"""ViT tile encoders built from a timm architecture + kwargs (the models' own timm configs).

uni, uni2, gigapath, h-optimus-0/1, virchow / virchow-full / virchow2, mstar,
red-dino and dino-bloom. Weights are loaded through timm's own checkpoint filter
(pos-embed resampling, DINOv2 key conversion), i.e. what ``timm.create_model(
"hf-hub:...", pretrained=True)`` does, but from a verified local file.

Pooling follows STAMP: ``virchow`` and ``virchow2`` return the CLS token only (the
Virchow2 card recommends CLS + mean of patch tokens; STAMP does not), ``virchow-full``
returns concat(CLS, mean of patch tokens), 2560-d.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stamp.encoders.registry import (
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    EncoderSpec,
    Family,
    InputSpec,
    WeightsSource,
    register,
)

_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
_PUBLIC = "public registries (raw2features registry.yaml and an independent benchmark), not re-verified here"
_ONE_PUBLIC = "one public registry (raw2features registry.yaml), not re-verified here"


def _timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    import timm.layers
    import torch

    kw = {k: v for k, v in spec.timm_kwargs.items() if not k.startswith("_")}
    if kw.get("mlp_layer") == "SwiGLUPacked":
        kw["mlp_layer"] = timm.layers.SwiGLUPacked
    if kw.get("act_layer") == "SiLU":
        kw["act_layer"] = torch.nn.SiLU
    return kw


def build(spec: EncoderSpec):  # -> nn.Module
    import timm
    from torch import nn

    assert spec.timm_arch is not None, f"encoder {spec.name!r}: the timm-vit family needs timm_arch"
    base = timm.create_model(spec.timm_arch, pretrained=False, **_timm_kwargs(spec))
    pool = spec.timm_kwargs.get("_pool", "default")
    if pool == "default":
        return base.eval()

    class TokenPool(nn.Module):
        """Pool the token sequence of a ``global_pool=''`` ViT: CLS, or concat(CLS, mean of patch tokens)."""

        def __init__(self, vit: nn.Module, mode: str) -> None:
            super().__init__()
            self.vit = vit
            self.mode = mode
            self.n_prefix = int(getattr(vit, "num_prefix_tokens", 1))

        def forward(self, x):
            import torch

            tokens = self.vit(x)  # (N, T, C)
            cls = tokens[:, 0]
            if self.mode == "cls":
                return cls
            return torch.cat([cls, tokens[:, self.n_prefix :].mean(dim=1)], dim=-1)

    return TokenPool(base, pool).eval()


def _base_vit(model):
    return getattr(model, "vit", model)


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    from stamp.encoders.loading import load_strict, read_trusted

    (path,) = files.values()
    sd = read_trusted(path)
    key = spec.timm_kwargs.get("_state_key")
    if key:  # DinoBloom: the DINOv2 training checkpoint's teacher, minus its heads
        sd = {
            k.removeprefix("backbone."): v
            for k, v in sd[key].items()
            if "dino_head" not in k and "ibot_head" not in k
        }
    vit = _base_vit(model)
    sd = checkpoint_filter_fn(sd, vit)
    load_strict(vit, sd, f"encoder {spec.name!r} ({path})")


FAMILY = Family(build=build, load_weights=load_weights)


def _vit(name: str, **kw: Any) -> None:
    register(EncoderSpec(name=name, family="timm-vit", builder="timm", **kw), FAMILY)


_vit(
    "uni",
    timm_arch="vit_large_patch16_224",
    timm_kwargs={
        "img_size": 224,
        "patch_size": 16,
        "init_values": 1e-5,
        "num_classes": 0,
        "dynamic_img_size": True,
    },
    dim=1024,
    n_params=303_350_784,
    params_note="ViT-L/16, ~303M (UNI card)",
    input=InputSpec(224, 224, interpolation="bilinear"),
    tile_px=224,
    mpp=0.5,
    precision="fp16",
    weights=WeightsSource(
        hf_repo="MahmoodLab/UNI",
        revision="b55a5ec6cade1a39edfe6534189a9b8ca7a022f0",
        files={"pytorch_model.bin": "56ef09b44a25dc5c7eedc55551b3d47bcd17659a7a33837cf9abc9ec4e2ffb40"},
        digest_source=_PUBLIC,
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
    notes="STAMP pins revision 77ffbca1ee1cdcee6e87f6deebd2db8a5888c721 (same pytorch_model.bin expected)",
)

_vit(
    "uni2",
    timm_arch="vit_giant_patch14_224",
    timm_kwargs={
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "num_classes": 0,
        "no_embed_class": True,
        "reg_tokens": 8,
        "dynamic_img_size": True,
        **_SWIGLU,
    },
    dim=1536,
    n_params=681_394_176,
    params_note="ViT-H/14 SwiGLU + 8 register tokens, ~681M (UNI2-h card)",
    input=InputSpec(224, 224, interpolation="bilinear"),
    tile_px=224,
    mpp=0.5,
    precision="bf16",
    weights=WeightsSource(
        hf_repo="MahmoodLab/UNI2-h",
        revision="d517a8dd47902dd7c308b3c36f63bce47e7b9a43",
        files={"pytorch_model.bin": "6e077eda234bebc595868d918d3458d9dd32a050199b0ff04443b2f46a0a3b1e"},
        digest_source=_PUBLIC,
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
)

_vit(
    "gigapath",
    timm_arch="vit_giant_patch14_dinov2",
    timm_kwargs={
        "img_size": 224,
        "in_chans": 3,
        "patch_size": 16,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "init_values": 1e-5,
        "mlp_ratio": 5.33334,
        "num_classes": 0,
    },
    dim=1536,
    n_params=1_134_953_984,
    params_note="ViT-g/16 (DINOv2 recipe), ~1.13B (Prov-GigaPath paper)",
    input=InputSpec(256, 224, interpolation="bicubic"),
    tile_px=256,
    mpp=0.5,
    precision="fp16",
    weights=WeightsSource(
        hf_repo="prov-gigapath/prov-gigapath",
        revision="eba85dd46097c3eedfcc2a3a9a930baecb6bcc19",
        files={"pytorch_model.bin": "877947214318afa9e011754b74bbc3894a1f480a253afc7bc8045b8321dedd63"},
        digest_source=_PUBLIC,
    ),
    license="Apache-2.0 (card: research use only)",
    gated=True,
)

for _name, _rev, _sha, _lic in (
    (
        "h-optimus-0",
        "b145cc1e6c6b30d3251aa8b1f844e6974188a743",
        "bf47b8467403079798661601b6ab06533be789da48d3f8b510aaefe2fbc55cd3",
        "Apache-2.0",
    ),
    (
        "h-optimus-1",
        "3592cb220dec7a150c5d7813fb56e68bd57473b9",
        "c4f1e5b457ddf00679626053b0bf2899be6a19c3a04ad191c87ad1cdfd1abfe1",
        "CC-BY-NC-ND-4.0",
    ),
):
    _vit(
        _name,
        timm_arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "global_pool": "token",
            "dynamic_img_size": False,
        },
        dim=1536,
        n_params=1_134_774_272,
        params_note="ViT-g/14 + 4 register tokens, ~1.1B (Bioptimus card)",
        input=InputSpec(224, None, HOPTIMUS_MEAN, HOPTIMUS_STD, interpolation="bilinear"),
        tile_px=224,
        mpp=0.5,
        precision="fp16",
        weights=WeightsSource(
            hf_repo=f"bioptimus/{_name.replace('h-optimus', 'H-optimus')}",
            revision=_rev,
            files={"model.safetensors": _sha},
            digest_source=_ONE_PUBLIC + "; the file name is our best guess",
        ),
        license=_lic,
        gated=True,
    )

_VIRCHOW = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    **_SWIGLU,
}
_VIRCHOW1_WEIGHTS = WeightsSource(
    hf_repo="paige-ai/Virchow",
    revision="19eebc84ae33e79f1b2d866e6ff90ae50e522f9a",
    files={"model.safetensors": "3416891b37a2349a2d9ce7ecf00b64a6277011b41351436c1ceb0abb80805408"},
    digest_source=_ONE_PUBLIC + "; the file name is our best guess",
)
for _name, _pool, _dim in (("virchow", "cls", 1280), ("virchow-full", "cls+mean", 2560)):
    _vit(
        _name,
        timm_arch="vit_huge_patch14_224",
        timm_kwargs={**_VIRCHOW, "_pool": _pool},
        dim=_dim,
        n_params=631_229_184,
        params_note="ViT-H/14 SwiGLU, ~632M (Virchow paper)",
        input=InputSpec(224, 224, interpolation="bicubic"),
        tile_px=224,
        mpp=0.5,
        precision="fp16",
        weights=_VIRCHOW1_WEIGHTS,
        license="Apache-2.0",
        gated=True,
        notes="CLS token only, like STAMP"
        if _pool == "cls"
        else "concat(CLS, mean of patch tokens), like STAMP",
    )

_vit(
    "virchow2",
    timm_arch="vit_huge_patch14_224",
    timm_kwargs={**_VIRCHOW, "reg_tokens": 4, "_pool": "cls"},
    dim=1280,
    n_params=631_239_424,
    params_note="ViT-H/14 SwiGLU + 4 register tokens, ~632M (Virchow2 card)",
    input=InputSpec(224, 224, interpolation="bicubic"),
    tile_px=224,
    mpp=0.5,
    precision="fp16",
    weights=WeightsSource(
        hf_repo="paige-ai/Virchow2",
        revision="3158645804b69e3f3bc4439d4116edddf0840a72",
        files={"model.safetensors": "8d6cea947eb2418c3b0dff48cfb9b238e47744ab0dfca21b2b0637b140769b4b"},
        digest_source=_PUBLIC,
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
    notes="CLS token only, like STAMP (the model card recommends concat(CLS, mean of patch tokens), 2560-d)",
)

_vit(
    "mstar",
    timm_arch="vit_large_patch16_224",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
    dim=1024,
    n_params=303_350_784,
    params_note="ViT-L/16, ~303M",
    input=InputSpec(224, None, interpolation="bilinear"),
    tile_px=224,
    mpp=0.5,
    precision="fp16",
    weights=WeightsSource(
        hf_repo="Wangyh/mSTAR",
        revision="162ae5da9897d4ff8b9a4c2daea175ae45012ef7",
        files={"pytorch_model.bin": "13b2df84648420bbc0fd2eca43ddfb5b7c9764920149988b3e015f39ed6f07ee"},
        digest_source=_ONE_PUBLIC + "; the file name is our best guess",
    ),
    license="CC-BY-NC-ND-4.0",
    gated=True,
    notes="ImageNet mean/std as in the card's code (its timm config says 0.5)",
)

_vit(
    "red-dino",
    timm_arch="vit_large_patch14_dinov2",
    timm_kwargs={"img_size": 224, "num_classes": 0},
    dim=1024,
    n_params=303_227_904,
    params_note="DINOv2 ViT-L/14, ~304M",
    input=InputSpec(224, None, interpolation="bilinear", resize_mode="square"),
    tile_px=224,
    mpp=None,
    precision="fp16",
    weights=WeightsSource(hf_repo="Snarcy/RedDino-large", revision=None, files={"model.safetensors": None}),
    license="unknown (see the Snarcy/RedDino-large card)",
    gated=False,
    notes="red-blood-cell model (blood smears); CLS token; no pinned revision or digest found",
)

_vit(
    "dino-bloom",
    timm_arch="vit_small_patch14_dinov2",
    timm_kwargs={"img_size": 224, "num_classes": 0, "_state_key": "teacher"},
    dim=384,
    n_params=21_628_800,
    params_note="DINOv2 ViT-S/14, ~22M (DinoBloom-S)",
    input=InputSpec(224, None, interpolation="bilinear"),
    tile_px=224,
    mpp=None,
    precision="fp32",
    weights=WeightsSource(
        url="https://zenodo.org/records/10908163/files/DinoBloom-S.pth",
        files={"DinoBloom-S.pth": "c2f7990b003e89bcece80e379fb8fe0ba2ec392ce19b286e8a294abd99568e44"},
        digest_source="STAMP (src/stamp/preprocessing/extractor/dinobloom.py)",
        legacy_cache="dinobloom-s.pth",
    ),
    license="unknown (Zenodo record 10908163)",
    gated=False,
    notes="haematology (blood smear) model; STAMP applies no resize (identical at 224 px tiles)",
)
