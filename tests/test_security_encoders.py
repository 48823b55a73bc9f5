"""Encoders that run code shipped with their weights (TITAN's ``trust_remote_code``), symlinks
out of the weights folder, files swapped after verification, and the pipeline's strict loading.

``transformers`` is not installed in the test environment, so a stand-in ``transformers``
module does what ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` does: read
``config.json``'s ``auto_map`` and execute ``<module>.py`` from ``folder``. Everything else
is the real path: ``load_encoder("conch1_5")`` -> resolve -> verify -> ``titan.load``.
The "remote code" the tests write creates a marker file when it is executed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import uuid
from pathlib import Path

import pytest
import torch

from stamp.encoders import load_encoder
from stamp.encoders.errors import WeightsDigestError, WeightsOutsideRootError, WeightsUnverifiedError
from stamp.encoders.families.timm_vit import FAMILY as TIMM_FAMILY
from stamp.encoders.registry import get_spec, register, unregister
from stamp.encoders.weights import file_sha256
from tests.test_encoders_loading import TINY, _tiny_spec

GENUINE = "class Titan:\n    def return_conch(self):\n        import torch\n        return torch.nn.Linear(4, 768), None\n"


def _evil(marker: Path) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" + GENUINE


@pytest.fixture
def fake_transformers(monkeypatch):
    """A ``transformers`` whose AutoModel executes the folder's remote code; records the folders loaded."""
    loaded: list[Path] = []

    class AutoModel:
        @staticmethod
        def from_pretrained(folder, *, trust_remote_code=False, local_files_only=False):
            assert trust_remote_code and local_files_only
            folder = Path(folder)
            module, cls = json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].split(".")
            spec = importlib.util.spec_from_file_location(
                f"remote_{uuid.uuid4().hex}", folder / f"{module}.py"
            )
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            loaded.append(folder)
            return getattr(mod, cls)()

    for name in ("transformers", "einops", "einops_exts"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["transformers"].AutoModel = AutoModel  # type: ignore[attr-defined]
    return loaded


@pytest.fixture
def titan_dir(tmp_path: Path):
    """``weights/conch1_5/`` with every file the lock lists, and a lock pinning all of them."""
    wdir = tmp_path / "weights"
    folder = wdir / "conch1_5"
    folder.mkdir(parents=True)
    for fn in get_spec("conch1_5").weights.files:  # type: ignore[union-attr]
        (folder / fn).write_text(f"# {fn}\n")
    (folder / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_titan.Titan"}}))
    (folder / "modeling_titan.py").write_text(GENUINE)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    lock = {
        "format": 1,
        "encoders": {
            "conch1_5": {
                "repo": "MahmoodLab/TITAN",
                "revision": "0" * 40,
                "files": {p.name: file_sha256(p) for p in folder.iterdir()},
            }
        },
    }
    return wdir, lock, tmp_path / "MARKER"


def test_remote_code_runs_from_a_private_verified_copy(fake_transformers, titan_dir, tmp_path):
    wdir, lock, _ = titan_dir
    enc = load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf")
    assert enc.dim == 768 and set(enc.file_digests["conch1_5"]) == set(lock["encoders"]["conch1_5"]["files"])
    (folder,) = fake_transformers
    assert not folder.resolve().is_relative_to(wdir.resolve())  # never the weights folder itself
    assert not folder.exists()  # the private copy is removed once the model is built


def test_unpinned_remote_code_file_is_refused_and_never_runs(fake_transformers, titan_dir, tmp_path):
    wdir, lock, marker = titan_dir
    (wdir / "conch1_5" / "modeling_titan.py").write_text(_evil(marker))
    lock["encoders"]["conch1_5"]["files"]["modeling_titan.py"] = None
    with pytest.raises(WeightsUnverifiedError) as e:  # not strict: remote code is always strict
        load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf")
    msg = str(e.value)
    assert "\n" not in msg and str(wdir / "conch1_5" / "modeling_titan.py") in msg
    assert "trust_remote_code" in msg and "python -m stamp.encoders pin conch1_5" in msg
    assert not marker.exists() and fake_transformers == []


def test_changed_remote_code_file_is_refused(fake_transformers, titan_dir, tmp_path):
    wdir, lock, marker = titan_dir
    (wdir / "conch1_5" / "conch_v1_5.py").write_text(_evil(marker))
    with pytest.raises(WeightsDigestError, match="conch_v1_5.py"):
        load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf")
    assert not marker.exists() and fake_transformers == []


def test_remote_code_swapped_after_verification_never_runs(
    fake_transformers, titan_dir, tmp_path, monkeypatch
):
    wdir, lock, marker = titan_dir
    import stamp.encoders.families.titan as titan

    real = titan._require_vendor

    def swap_then_check(spec):  # runs after the digests were checked, just before from_pretrained
        (wdir / "conch1_5" / "modeling_titan.py").write_text(_evil(marker))
        real(spec)

    monkeypatch.setattr(titan, "_require_vendor", swap_then_check)
    enc = load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf")
    assert enc.dim == 768 and not marker.exists()


@pytest.mark.parametrize("filename", ["modeling_titan.py", "model.safetensors"])
def test_file_symlinked_out_of_the_weights_folder_is_refused(
    fake_transformers, titan_dir, tmp_path, filename
):
    """The review's attack: genuine files linked in from elsewhere next to a cohort's own files."""
    wdir, lock, marker = titan_dir
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = wdir / "conch1_5" / filename
    (outside / filename).write_bytes(link.read_bytes())  # same bytes: the digest alone would accept it
    link.unlink()
    link.symlink_to(outside / filename)
    with pytest.raises(WeightsOutsideRootError) as e:
        load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf")
    msg = str(e.value)
    assert "\n" not in msg and str(link) in msg and "outside the weights folder" in msg
    assert fake_transformers == []
    # a link that stays inside the weights folder is fine
    shared = wdir / "shared"
    shared.mkdir()
    (outside / filename).rename(shared / filename)
    link.unlink()
    link.symlink_to(shared / filename)
    assert load_encoder("conch1_5", weights_dir=wdir, lock=lock, hf_cache_dir=tmp_path / "hf").dim == 768
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_swapped_after_verification_is_not_unpickled(tmp_path, monkeypatch):
    """A full unpickle (old checkpoints) reads the verified bytes, not whatever is on disk later."""
    from stamp.encoders import loading
    from stamp.encoders.registry import get_family

    torch.manual_seed(0)
    d = tmp_path / "w" / "ctranspath"
    d.mkdir(parents=True)
    ckpt = d / "ctranspath.pth"
    torch.save({"model": get_family("ctranspath").build(get_spec("ctranspath")).state_dict()}, ckpt)
    lock = {
        "format": 1,
        "encoders": {"ctranspath": {"url": "gdrive:x", "files": {"ctranspath.pth": file_sha256(ckpt)}}},
    }
    marker = tmp_path / "MARKER"
    real = loading.verify_files

    def verify_then_swap(*a, **k):
        out = real(*a, **k)
        torch.save({"model": _Evil(marker)}, ckpt)
        return out

    monkeypatch.setattr(loading, "verify_files", verify_then_swap)
    with pytest.raises(WeightsDigestError, match="ctranspath.pth"):
        load_encoder("ctranspath", weights_dir=tmp_path / "w", lock=lock)
    assert not marker.exists()


def test_pipeline_refuses_weights_without_a_pinned_digest(tmp_path, monkeypatch):
    """The preprocess task loads strictly: a null sha256 in the lock is refused, not warned about."""
    from stamp_tasks.preprocess import get_encoder

    register(_tiny_spec(), TIMM_FAMILY, replace=True)
    try:
        folder = tmp_path / "weights" / TINY
        folder.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(TIMM_FAMILY.build(get_spec(TINY)).state_dict(), str(folder / "model.safetensors"))
        lock = tmp_path / "lock.json"
        entry = {"repo": "example/tiny-vit", "revision": "0" * 40, "files": {"model.safetensors": None}}
        lock.write_text(json.dumps({"format": 1, "encoders": {TINY: entry}}))
        monkeypatch.setenv("STAMP_WEIGHTS_LOCK", str(lock))
        with pytest.raises(WeightsUnverifiedError, match="model.safetensors"):
            get_encoder(TINY, str(tmp_path / "weights"), "cpu")
    finally:
        unregister(TINY)


@pytest.mark.parametrize("name", ["../modeling_titan.py", "/etc/passwd", "a/../../b"])
def test_lock_file_names_cannot_leave_the_encoder_folder(tmp_path, name):
    from stamp.encoders.weights import load_lock

    entry = {"repo": "MahmoodLab/TITAN", "revision": "0" * 40, "files": {name: None}}
    with pytest.raises(ValueError, match="relative path without"):
        load_lock({"format": 1, "encoders": {"conch1_5": entry}})
