"""The full load path on small weight files the tests write: local dir -> sha256 check ->
state dict -> forward, plus the refusals (wrong digest, missing file) and the offline rule.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stamp.encoders import WeightsDigestError, WeightsNotFoundError, load_encoder
from stamp.encoders.errors import WeightsUnverifiedError
from stamp.encoders.families.timm_vit import FAMILY as TIMM_FAMILY
from stamp.encoders.registry import EncoderSpec, InputSpec, WeightsSource, get_family, register, unregister
from stamp.encoders.transforms import to_model_input
from stamp.encoders.weights import fetch_command, file_sha256, resolve_weights

TINY = "test-tiny-vit"


def _tiny_spec(**over) -> EncoderSpec:
    kw = dict(
        name=TINY,
        family="timm-vit",
        builder="timm",
        timm_arch="test_vit",
        timm_kwargs={"img_size": 64, "num_classes": 0},
        dim=64,
        n_params=None,
        input=InputSpec(64, 64, interpolation="bilinear"),
        tile_px=64,
        mpp=0.5,
        precision="bf16",
        weights=WeightsSource(
            hf_repo="example/tiny-vit", revision="0" * 40, files={"model.safetensors": None}
        ),
        license="test",
        gated=True,
    )
    kw.update(over)
    return EncoderSpec(**kw)


@pytest.fixture
def tiny(tmp_path: Path):
    """A tiny timm ViT registered as a test-only encoder, its weights written to weights_dir/<name>/."""
    spec = register(_tiny_spec(), TIMM_FAMILY, replace=True)
    torch.manual_seed(0)
    ref = TIMM_FAMILY.build(spec)
    wdir = tmp_path / "weights"
    (wdir / TINY).mkdir(parents=True)
    f = wdir / TINY / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    lock = {
        "format": 1,
        "encoders": {
            TINY: {
                "repo": "example/tiny-vit",
                "revision": "0" * 40,
                "files": {"model.safetensors": file_sha256(f)},
            }
        },
    }
    yield spec, ref, wdir, lock
    unregister(TINY)


def _tiles(n: int, px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def test_full_load_path_and_encode(tiny):
    spec, ref, wdir, lock = tiny
    enc = load_encoder(TINY, weights_dir=wdir, lock=lock)
    assert enc.name == TINY and enc.dim == 64 and enc.device.type == "cpu" and enc.precision == "bf16"
    assert len(enc.weights_sha256) == 64 and enc.preferred_batch_size > 0
    tiles = _tiles(5, 64)
    feats = enc.encode(tiles, batch_size=2)
    assert feats.shape == (5, 64) and feats.dtype == np.float16 and np.isfinite(feats).all()
    with torch.inference_mode():  # same numbers as the source network (no bf16 autocast on CPU)
        want = ref(to_model_input(torch.from_numpy(tiles), spec.input)).numpy()
    np.testing.assert_allclose(feats.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    # the digest is a function of the file contents only
    again = load_encoder(TINY, weights_dir=wdir, lock=lock)
    assert again.weights_sha256 == enc.weights_sha256


def test_wrong_sha256_is_refused(tiny):
    _, _, wdir, lock = tiny
    actual = lock["encoders"][TINY]["files"]["model.safetensors"]
    lock["encoders"][TINY]["files"]["model.safetensors"] = "ab" * 32
    with pytest.raises(WeightsDigestError) as e:
        load_encoder(TINY, weights_dir=wdir, lock=lock)
    msg = str(e.value)
    assert "ab" * 32 in msg and actual in msg and "model.safetensors" in msg
    assert e.value.expected == "ab" * 32 and e.value.actual == actual


def test_tampered_file_is_refused(tiny):
    _, _, wdir, lock = tiny
    f = wdir / TINY / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(WeightsDigestError):
        load_encoder(TINY, weights_dir=wdir, lock=lock)


def test_missing_file_names_the_fetch_command(tiny, tmp_path):
    empty = tmp_path / "nothing"
    with pytest.raises(WeightsNotFoundError) as e:
        load_encoder(TINY, weights_dir=empty, lock=tiny[3], hf_cache_dir=tmp_path / "hf")
    msg = str(e.value)
    cmd = f"hf download example/tiny-vit model.safetensors --revision {'0' * 40} --local-dir {empty / TINY}"
    assert cmd in msg and e.value.command.endswith(cmd)
    assert "accepting the licence at https://huggingface.co/example/tiny-vit" in msg and "login" in msg


def test_fetch_commands_for_url_sources(tmp_path):
    from stamp.encoders import get_spec

    assert "gdown 1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX" in fetch_command(get_spec("ctranspath"), tmp_path)
    assert "curl -L --fail -o" in fetch_command(get_spec("dino-bloom"), tmp_path)
    assert "licence" not in fetch_command(get_spec("plip"), tmp_path)


def test_unverified_file_warns_or_is_refused_in_strict_mode(tiny, caplog):
    _, _, wdir, lock = tiny
    lock["encoders"][TINY]["files"]["model.safetensors"] = None
    enc = load_encoder(TINY, weights_dir=wdir, lock=lock)
    assert "unverified" in caplog.text
    assert enc.file_digests[TINY]["model.safetensors"] == file_sha256(wdir / TINY / "model.safetensors")
    with pytest.raises(WeightsUnverifiedError, match="strict"):
        load_encoder(TINY, weights_dir=wdir, lock=lock, strict=True)


def test_hf_cache_offline_never_touches_the_network(tiny, tmp_path, monkeypatch):
    _, _, wdir, lock = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def no_network(*a, **k):
        attempts.append(a)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    # a Hugging Face cache holding the pinned revision
    cache = tmp_path / "hf"
    snap = cache / "models--example--tiny-vit" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes((wdir / TINY / "model.safetensors").read_bytes())
    files = resolve_weights(TINY, None, lock=lock, hf_cache_dir=cache)
    assert files["model.safetensors"] == snap / "model.safetensors"
    enc = load_encoder(TINY, lock=lock, hf_cache_dir=cache)
    assert enc.encode(_tiles(2, 64)).shape == (2, 64)
    # another revision is not in the cache: refused locally, still no network
    lock["encoders"][TINY]["revision"] = "1" * 40
    with pytest.raises(WeightsNotFoundError, match="HF cache example/tiny-vit@1111"):
        load_encoder(TINY, lock=lock, hf_cache_dir=cache)
    assert attempts == []


def test_weights_dir_from_environment(tiny, monkeypatch):
    _, _, wdir, lock = tiny
    monkeypatch.setenv("STAMP_WEIGHTS_DIR", str(wdir))
    assert load_encoder(TINY, lock=lock).dim == 64


def test_ctranspath_loads_an_original_layout_checkpoint(tmp_path):
    """CTransPath's release uses the pre-0.9 timm Swin layout; it must load strictly and match."""
    fam = get_family("ctranspath")
    from stamp.encoders import get_spec

    spec = get_spec("ctranspath")
    torch.manual_seed(1)
    ref = fam.build(spec)
    old = {}
    for k, v in ref.state_dict().items():  # timm >= 0.9 -> original layout (downsample at the end of a stage)
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        old[k] = v
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # persisted buffers of the old code
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    d = tmp_path / "w" / "ctranspath"
    d.mkdir(parents=True)
    torch.save({"model": old}, d / "ctranspath.pth")
    lock = {
        "format": 1,
        "encoders": {
            "ctranspath": {"url": "gdrive:x", "files": {"ctranspath.pth": file_sha256(d / "ctranspath.pth")}}
        },
    }
    enc = load_encoder("ctranspath", weights_dir=tmp_path / "w", lock=lock)
    tiles = _tiles(2, 224)
    with torch.inference_mode():
        want = ref.eval()(to_model_input(torch.from_numpy(tiles), spec.input)).numpy()
    np.testing.assert_allclose(enc.encode(tiles).astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_dino_bloom_teacher_checkpoint(tmp_path):
    """DinoBloom ships a DINOv2 training checkpoint: teacher backbone + heads + mask token."""
    from stamp.encoders import get_spec

    spec = get_spec("dino-bloom")
    torch.manual_seed(2)
    ref = get_family("dino-bloom").build(spec)
    teacher = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    teacher["backbone.mask_token"] = torch.zeros(1, 384)
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 384)
    d = tmp_path / "w" / "dino-bloom"
    d.mkdir(parents=True)
    torch.save({"teacher": teacher, "student": {}}, d / "DinoBloom-S.pth")
    lock = {
        "format": 1,
        "encoders": {
            "dino-bloom": {
                "url": "https://x",
                "files": {"DinoBloom-S.pth": file_sha256(d / "DinoBloom-S.pth")},
            }
        },
    }
    enc = load_encoder("dino-bloom", weights_dir=tmp_path / "w", lock=lock)
    tiles = _tiles(2, 224, seed=3)
    with torch.inference_mode():
        want = ref.eval()(to_model_input(torch.from_numpy(tiles), spec.input)).numpy()
    np.testing.assert_allclose(enc.encode(tiles).astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_conch_checkpoint_keys_load_strictly(tmp_path):
    """The CONCH image tower loads the visual.* subset of a full CoCa checkpoint, strictly."""
    from stamp.encoders import get_spec

    fam, spec = get_family("conch"), get_spec("conch")
    torch.manual_seed(3)
    ref = fam.build(spec)
    full = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    full["visual.attn_pool_caption.query"] = torch.zeros(256, 768)  # unused parts of CoCa
    full["text.token_embedding.weight"] = torch.zeros(10, 768)
    full["logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "pytorch_model.bin"
    torch.save(full, path)
    model = fam.build(spec)
    fam.load_weights(model, {"pytorch_model.bin": path}, spec)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    del full["visual.ln_contrast.weight"]
    torch.save(full, path)
    with pytest.raises(ValueError, match="missing 1"):
        fam.load_weights(fam.build(spec), {"pytorch_model.bin": path}, spec)


def test_keep_checkpoint_keys_and_config(tmp_path):
    from stamp.encoders import get_spec

    fam, spec = get_family("keep"), get_spec("keep")
    with torch.device("meta"):
        names = list(fam.build(spec).state_dict())
    assert any(n.endswith("ls1.gamma") for n in names) and "visual_head.2.weight" in names
    (tmp_path / "config.json").write_text(
        json.dumps({"projection_dim": 512, "vision_config": {"img_size": 224}})
    )
    with pytest.raises(ValueError, match="config.json"):
        fam.load_weights(
            None, {"config.json": tmp_path / "config.json", "model.safetensors": tmp_path / "x"}, spec
        )


def test_transform_matches_torchvision():
    from torchvision.transforms import v2

    from stamp.encoders.registry import IMAGENET_MEAN, IMAGENET_STD

    tiles = _tiles(3, 256, seed=4)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    norm = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    for interp in ("bilinear", "bicubic"):
        mode = getattr(v2.InterpolationMode, interp.upper())
        resized = v2.Resize(224, interpolation=mode, antialias=True)(v2.ToDtype(torch.float32, scale=True)(x))
        want = norm(v2.CenterCrop(200)(resized.clamp(0, 1)))  # PIL resizes in uint8: values stay in range
        got = to_model_input(torch.from_numpy(tiles), InputSpec(224, 200, interpolation=interp))
        assert got.shape == (3, 3, 200, 200)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    same = to_model_input(torch.from_numpy(tiles[:, :224, :224]), InputSpec(224, 224))
    np.testing.assert_allclose(
        same[0, 0, 0, 0].item(), (tiles[0, 0, 0, 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], rtol=1e-5
    )
    square = to_model_input(
        torch.from_numpy(_tiles(1, 300)[:, :, :250]), InputSpec(224, None, resize_mode="square")
    )
    assert square.shape == (1, 3, 224, 224)
    with pytest.raises(TypeError):
        to_model_input(torch.zeros(1, 8, 8, 3), InputSpec(224, 224))


def test_empty_encoder():
    enc = load_encoder("empty")
    out = enc.encode(_tiles(4, 32))
    assert out.shape == (4, 0) and out.dtype == np.float16
    assert enc.weights_sha256 != load_encoder("demo").weights_sha256


def test_autocast_only_on_cuda(tiny):
    _, _, wdir, lock = tiny
    enc = load_encoder(TINY, weights_dir=wdir, lock=lock)
    import contextlib

    assert isinstance(enc.autocast(), contextlib.nullcontext)  # bf16 spec, CPU device: no autocast


def test_weights_digest_without_building_equals_the_loaded_encoders(tiny, tmp_path: Path) -> None:
    """The preprocess flow keys its cache with encoder_weights_digest (no torch, no network built): it must be
    exactly what the encoder that later encodes the tiles reports, and refuse what load_encoder refuses."""
    from stamp.encoders import encoder_weights_digest

    spec, ref, wdir, lock = tiny
    assert (
        encoder_weights_digest(TINY, weights_dir=wdir, lock=lock)
        == load_encoder(TINY, weights_dir=wdir, lock=lock, strict=True).weights_sha256
    )
    assert encoder_weights_digest("empty") == load_encoder("empty").weights_sha256
    assert encoder_weights_digest("demo") == load_encoder("demo").weights_sha256
    empty = load_encoder("empty")
    assert empty.model is None and empty.encode(_tiles(3, 224)).shape == (3, 0)
    with pytest.raises(WeightsNotFoundError):
        encoder_weights_digest(TINY, weights_dir=tmp_path / "nowhere", lock=lock)
    (wdir / TINY / "model.safetensors").write_bytes(b"not the pinned bytes")
    with pytest.raises(WeightsDigestError):
        encoder_weights_digest(TINY, weights_dir=wdir, lock=lock)
