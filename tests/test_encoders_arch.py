"""Every registry entry's architecture, built without weights on the meta device: output dim
and parameter count equal the declared ones. Vendor entries whose package is missing must
name their extra, and are still checked through their vendor-free equivalent where one exists.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stamp.encoders import ENCODERS, MissingExtraError, build_architecture, get_spec
from stamp.encoders.registry import get_family

_VENDOR_MODULES = {"plip": "transformers", "conch1_5": "transformers", "musk": "musk"}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_check(model: torch.nn.Module, name: str) -> None:
    spec = get_spec(name)
    px = spec.input.out_px or spec.tile_px
    with torch.device("meta"):
        y = model(torch.empty(2, 3, px, px))
    assert tuple(y.shape) == (2, spec.dim), f"{name}: output {tuple(y.shape)} vs declared dim {spec.dim}"
    assert _n_params(model) == spec.n_params, (
        f"{name}: {_n_params(model):,} parameters vs declared {spec.n_params:,}"
    )


@pytest.mark.parametrize("name", list(ENCODERS))
def test_architecture_dim_and_params_on_meta(name):
    spec = get_spec(name)
    vendor_mod = _VENDOR_MODULES.get(name)
    vendor_missing = vendor_mod is not None and importlib.util.find_spec(vendor_mod) is None
    if vendor_missing:
        with torch.device("meta"), pytest.raises(MissingExtraError) as e:
            build_architecture(name)
        assert f"stamp-orchestrated[{spec.extra}]" in str(e.value) and name in str(e.value)
        if get_family(name).build_equivalent is None:
            assert spec.n_params is None  # nothing to check it against without the vendor package
            return
        with torch.device("meta"):
            model = build_architecture(name, equivalent=True)
        _meta_check(model, name)
        return
    if get_family(name).load is not None:  # architecture ships with its weights (remote code)
        with torch.device("meta"):
            model = build_architecture(name, equivalent=True)
        _meta_check(model, name)
        return
    with torch.device("meta"):
        model = build_architecture(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    _meta_check(model, name)


def test_ctranspath_stem_is_convolutional():
    with torch.device("meta"):
        m = build_architecture("ctranspath")
    convs = [mod for mod in m.patch_embed.proj if isinstance(mod, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)] and convs[-1].out_channels == 96
