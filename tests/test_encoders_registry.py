"""Encoder registry: names, fields, table, lock file, cheap import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stamp.encoders import ENCODERS, STAMP_ENCODER_NAMES, encoder_table, get_spec
from stamp.encoders.errors import UnknownEncoderError
from stamp.encoders.weights import default_lock, load_lock, lock_to_json

REPO = Path(__file__).resolve().parents[1]


def test_all_stamp_names_plus_empty_and_demo():
    assert len(STAMP_ENCODER_NAMES) == 19  # a fact about STAMP 2.5 (reference §2.2), not a registry count
    assert {*STAMP_ENCODER_NAMES, "empty", "demo"} <= set(ENCODERS)


def test_every_family_file_is_discovered():
    """Each module of stamp/encoders/families registers at least one encoder; no list names them."""
    import pkgutil

    from stamp.encoders import families
    from stamp.encoders.registry import get_family

    modules = {m.name for m in pkgutil.iter_modules(families.__path__) if not m.name.startswith("_")}
    assert all(f"stamp.encoders.families.{m}" in sys.modules for m in modules)
    registered_by = {get_family(n).build.__module__.rsplit(".", 1)[-1] for n in ENCODERS}
    assert modules <= registered_by


def test_preprocessing_code_hash_covers_every_family_file():
    import stamp
    from stamp.hashing import code_hash
    from stamp.preprocessing import preprocessing_code_hash

    pkg = Path(stamp.__file__).parent
    files = [*(pkg / "slides").glob("*.py"), *(pkg / "encoders").rglob("*.py")]
    assert any(f.parent.name == "families" for f in files)
    stage = [*(pkg / "preprocessing").glob("*.py"), pkg / "features.py"]
    assert preprocessing_code_hash() == code_hash([*files, *stage])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_field_present(name):
    s = get_spec(name)
    assert s.name == name and s.family and s.builder in ("timm", "native", "transformers", "vendor")
    assert s.dim >= 0 and s.tile_px > 0 and s.precision in ("fp32", "fp16", "bf16")
    assert s.license and isinstance(s.gated, bool)
    assert len(s.input.mean) == 3 and len(s.input.std) == 3 and all(v > 0 for v in s.input.std)
    assert s.input.interpolation in ("bilinear", "bicubic")
    if s.weights is not None:
        assert s.weights.files and (s.weights.hf_repo or s.weights.url)
        for sha in s.weights.files.values():
            assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0)
    if s.extra is not None:
        assert s.builder in ("vendor", "transformers")
    if name in ("empty", "demo"):
        assert s.weights is None and s.n_params == 0
    else:
        assert s.weights is not None and s.research_use
    assert get_spec("demo").research_use is False


def test_stamp_specific_operating_points():
    assert get_spec("virchow2").dim == 1280 and "CLS token only" in get_spec("virchow2").notes
    assert get_spec("virchow-full").dim == 2560
    assert get_spec("musk").dim == 2048
    assert get_spec("conch").dim == 512 and get_spec("conch").input.out_px == 448
    assert get_spec("empty").dim == 0
    assert get_spec("ticon").components == ("h-optimus-1",)
    # STAMP's truncated digests extend to the full ones we pin
    assert get_spec("ctranspath").weights.files["ctranspath.pth"].startswith("7c998680")
    assert get_spec("chief-ctranspath").weights.files["chief_ctranspath.pth"].startswith("1646f230")
    assert get_spec("dino-bloom").weights.files["DinoBloom-S.pth"].startswith("c2f7990b")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownEncoderError) as e:
        get_spec("unii")
    msg = str(e.value)
    assert "unii" in msg and "uni" in msg and "ctranspath" in msg and "demo" in msg
    assert isinstance(e.value, KeyError)


def test_table_lists_every_encoder():
    table = encoder_table()
    lines = table.splitlines()
    assert len(lines) == len(ENCODERS) + 2
    for name in ENCODERS:
        assert any(line.split()[0] == name for line in lines[2:])
    assert "NOT FOR RESEARCH USE" in table and "unverified" in table and "pinned" in table
    widths = {len(line.rstrip()) <= len(lines[1]) for line in lines}
    assert widths == {True}


def test_lock_file_matches_registry():
    on_disk = json.loads((REPO / "containers" / "weights.lock.json").read_text())
    assert on_disk == lock_to_json(default_lock()), (
        "regenerate: python -m stamp.encoders lock -o containers/weights.lock.json"
    )
    assert load_lock(REPO / "containers" / "weights.lock.json") == default_lock()


def test_lock_env_override(tmp_path, monkeypatch):
    p = tmp_path / "lock.json"
    p.write_text(
        json.dumps(
            {"format": 1, "encoders": {"uni": {"repo": "x/y", "revision": "r", "files": {"a.bin": None}}}}
        )
    )
    monkeypatch.setenv("STAMP_WEIGHTS_LOCK", str(p))
    lock = load_lock()
    assert lock["uni"].hf_repo == "x/y" and lock["uni"].files == {"a.bin": None}
    assert lock["conch"] == default_lock()["conch"]  # the rest comes from the registry
    p.write_text(json.dumps({"format": 1, "encoders": {"uni": {"repo": "x/y", "files": {"a.bin": "abc"}}}}))
    with pytest.raises(ValueError, match="64 hex"):
        load_lock()


def test_import_is_torch_free_and_cli_prints_table():
    code = "import sys, stamp.encoders as e; e.encoder_table(); print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False False"
    out = subprocess.run(
        [sys.executable, "-m", "stamp.encoders"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert "virchow2" in out.stdout and "gated" in out.stdout
