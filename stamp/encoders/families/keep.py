"""KEEP: UNI-style ViT-L/16 image tower + a 2-layer GELU projection head, L2-normalised, 768-d.

Only the image path of the released ``model.safetensors`` is used (its ``visual.*``
and ``visual_head.*`` keys; LayerScale weights renamed ``.weight`` -> ``.gamma`` for
timm), loaded strictly; the BERT text tower and remote code are never touched.
``config.json`` is read to check it still describes this architecture.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from stamp.encoders.registry import EncoderSpec, Family, InputSpec, WeightsSource, register

_VISION: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}
_PROJECTION_DIM = 768


@functools.cache
def _keep_class():
    import torch
    from torch import nn

    class KeepImage(nn.Module):
        def __init__(self, projection_dim: int) -> None:
            super().__init__()
            import timm

            self.visual = timm.create_model("vit_large_patch16_224", pretrained=False, **_VISION)
            self.visual_head = nn.Sequential(
                nn.Linear(cast(int, self.visual.num_features), projection_dim),
                nn.GELU(),
                nn.Linear(projection_dim, projection_dim),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.visual_head(self.visual(x)), dim=-1)

    return KeepImage


def build(spec: EncoderSpec):
    return _keep_class()(spec.dim).eval()


def load_weights(model, files: Mapping[str, Path], spec: EncoderSpec) -> None:
    from stamp.encoders.loading import load_strict, read_trusted

    cfg = json.loads(Path(files["config.json"]).read_text())
    vc = cfg.get("vision_config", {})
    want = {"projection_dim": spec.dim, "img_size": _VISION["img_size"], "patch_size": _VISION["patch_size"]}
    got = {
        "projection_dim": cfg.get("projection_dim"),
        "img_size": vc.get("img_size"),
        "patch_size": vc.get("patch_size"),
    }
    if any(got[k] is not None and got[k] != v for k, v in want.items()):
        raise ValueError(f"encoder {spec.name!r}: config.json describes {got}, this loader expects {want}")
    sd = read_trusted(files["model.safetensors"])
    sd = {k: v for k, v in sd.items() if k.startswith(("visual.", "visual_head."))}
    sd = {
        (k[: -len(".weight")] + ".gamma" if (".ls1.weight" in k or ".ls2.weight" in k) else k): v
        for k, v in sd.items()
    }
    load_strict(model, sd, f"encoder {spec.name!r} ({files['model.safetensors']})")


register(
    EncoderSpec(
        name="keep",
        family="keep",
        builder="native",
        timm_arch="vit_large_patch16_224",
        timm_kwargs=_VISION,
        dim=_PROJECTION_DIM,
        n_params=304_728_576,
        params_note="ViT-L/16 + 1024-768-768 projection, ~305M (image tower only)",
        input=InputSpec(224, 224, interpolation="bicubic"),
        tile_px=224,
        mpp=None,
        precision="fp16",
        weights=WeightsSource(
            hf_repo="Astaxanthin/KEEP",
            revision=None,
            files={"model.safetensors": None, "config.json": None},
        ),
        license="MIT",
        gated=False,
        notes="no revision or digest found to pin; authors give no physical scale (choose the mpp explicitly)",
    ),
    Family(build=build, load_weights=load_weights),
)
