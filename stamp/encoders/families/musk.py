"""MUSK: BEiT3-style vision-language model; STAMP's vision CLS with multi-scale augmentation.

Built with the vendor package (``musk``, from github.com/lilab-stanford/MUSK; the
PyPI project named ``musk`` is an unrelated package), which registers the timm model
``musk_large_patch16_384``. STAMP calls ``model(image=x, with_head=False,
out_norm=False, ms_aug=True, return_global=True)[0]``: the CLS of the image at scales
1 and 2, concatenated -> 2048-d. There is no vendor-free build (the multiway
BEiT3 encoder is not re-implemented here), so its parameter count is not declared.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from stamp.encoders.errors import MissingExtraError
from stamp.encoders.registry import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    EncoderSpec,
    Family,
    InputSpec,
    WeightsSource,
    register,
)


def _require_vendor(spec: EncoderSpec) -> None:
    try:
        import musk.modeling  # noqa: F401  (registers musk_large_patch16_384 with timm)
        import musk.utils  # noqa: F401
    except ImportError:
        raise MissingExtraError(spec.name, spec.extra or "musk", "musk.modeling") from None


@functools.cache
def _wrapper_class():
    from torch import nn

    class MuskVision(nn.Module):
        def __init__(self, musk) -> None:
            super().__init__()
            self.musk = musk

        def forward(self, x):
            return self.musk(image=x, with_head=False, out_norm=False, ms_aug=True, return_global=True)[0]

    return MuskVision


def build(spec: EncoderSpec):
    _require_vendor(spec)
    import timm

    return _wrapper_class()(timm.create_model("musk_large_patch16_384", pretrained=False)).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from musk import utils

    (path,) = files.values()
    utils.load_model_and_may_interpolate(str(path), model.musk, "model|module", "")


register(
    EncoderSpec(
        name="musk",
        family="musk",
        builder="vendor",
        vendor_package="musk (github.com/lilab-stanford/MUSK)",
        timm_arch="musk_large_patch16_384",
        dim=2048,
        n_params=None,
        params_note="BEiT3-large multiway (MUSK paper); not re-implemented here",
        input=InputSpec(384, 384, INCEPTION_MEAN, INCEPTION_STD, interpolation="bicubic"),
        tile_px=384,
        mpp=0.5,
        precision="fp16",
        weights=WeightsSource(
            hf_repo="xiangjx/musk",
            revision="de1ffed28608c197d2903f6fa42b491a3fbf0fb8",
            files={"model.safetensors": "83d9f2429ec3f04fc3bdc4bc6d8e6c78035ea196fdce9fe05d76ea0e8cad0375"},
            digest_source="public registries (raw2features registry.yaml and a benchmark report), not re-verified here",
        ),
        license="CC-BY-NC-ND-4.0",
        gated=True,
        extra="musk",
        notes="ms_aug=True like STAMP: concat of the CLS at scales 1 and 2 (1024-d each)",
    ),
    Family(build=build, load_weights=load_weights),
)
