"""Our builds against the vendor packages, where those are installed (skipped otherwise).

* CONCH: our native image tower reproduces ``CoCa.encode_image(proj_contrast=False,
  normalize=False)`` of the vendor package (``conch-fork``, CONCH's code on PyPI) for the
  same random weights, loaded through our loader from a full CoCa state dict.
* PLIP: the transformers build loads a full ``CLIPModel`` state dict and reproduces
  ``get_image_features``; its parameter count equals the vendor-free equivalent's.
"""

from __future__ import annotations

import pytest
import torch

from stamp.encoders import build_architecture, get_spec
from stamp.encoders.registry import get_family


def test_conch_native_tower_matches_vendor_coca(tmp_path):
    pytest.importorskip("conch.open_clip_custom")
    from conch.open_clip_custom.coca_model import CoCa

    from stamp.encoders.families.conch import _classes

    cfg = {
        "embed_dim": 512,
        "embed_dim_caption": 768,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 16,
            "attentional_pool_caption": True,
            "attentional_pool_contrast": True,
            "attn_pooler_heads": 8,
            "n_queries_contrast": 1,
            "n_queries_caption": 8,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 100,
            "width": 768,
            "heads": 12,
            "layers": 1,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {"context_length": 16, "vocab_size": 100, "width": 768, "heads": 12, "layers": 1},
    }
    torch.manual_seed(0)
    coca = CoCa(**cfg).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(coca.state_dict(), path)
    ours = _classes()(img_size=64, embed_dim=512).eval()
    spec = get_spec("conch")
    get_family("conch").load_weights(ours, {"pytorch_model.bin": path}, spec)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = coca.encode_image(x, proj_contrast=False, normalize=False)
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plip_transformers_build_matches_clip_model(tmp_path):
    pytest.importorskip("transformers")
    from transformers import CLIPConfig, CLIPModel

    from stamp.encoders.families.plip import _CONFIG

    spec = get_spec("plip")
    with torch.device("meta"):
        n_hf = sum(p.numel() for p in build_architecture("plip").parameters())
        n_eq = sum(p.numel() for p in build_architecture("plip", equivalent=True).parameters())
    assert n_hf == n_eq == spec.n_params

    small = dict(_CONFIG, num_hidden_layers=2, image_size=64)
    cfg = CLIPConfig(
        vision_config=small,
        text_config={
            "num_hidden_layers": 1,
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_attention_heads": 2,
        },
        projection_dim=512,
    )
    torch.manual_seed(0)
    clip = CLIPModel(cfg).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(clip.state_dict(), path)

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from stamp.encoders.families.plip import _wrapper_class

    ours = _wrapper_class()(CLIPVisionModelWithProjection(CLIPVisionConfig(**small))).eval()
    get_family("plip").load_weights(ours, {"pytorch_model.bin": path}, spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = clip.get_image_features(pixel_values=x)
        want = getattr(want, "pooler_output", want)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
