"""The config asks the encoder registry: allowed extractor names, and each encoder's operating point
(declared ``mpp`` and ``tile_px``) against the config's ``tile_size_um`` / ``tile_size_px``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

from stamp.config import ConfigError, load_config
from stamp.config_models import PreprocessingConfig
from stamp.encoders import ENCODERS, OperatingPointWarning, check_operating_point, get_spec
from stamp.encoders.registry import get_family, register, unregister

REPO = Path(__file__).resolve().parents[1]
HEAD = "preprocessing:\n  output_dir: /out\n  wsi_dir: /wsi\n"


def _load(tmp_path: Path, body: str):
    path = tmp_path / "config.yaml"
    path.write_text(HEAD + body)
    return load_config(path)


def _error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, body)
    return str(err.value)


def _warnings(**keys: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PreprocessingConfig(output_dir=Path("/o"), wsi_dir=Path("/w"), **keys)
    return [str(w.message) for w in caught if issubclass(w.category, OperatingPointWarning)]


# --------------------------------------------------------------------------- names come from the registry


def test_unknown_extractor_is_one_line_naming_key_value_match_and_choices(tmp_path: Path) -> None:
    message = _error(tmp_path, "  extractor: unii\n")
    assert len(message.splitlines()) == 1
    assert "preprocessing.extractor: expected one of " in message
    assert "got 'unii' (did you mean 'uni'?)" in message and "[line 4]" in message
    for name in ENCODERS:  # the choices are the registry's, whatever it holds
        assert f"'{name}'" in message


def test_a_name_registered_at_run_time_is_accepted_and_gone_after_unregister(tmp_path: Path) -> None:
    register(dataclasses.replace(get_spec("empty"), name="test-registered-later"), get_family("empty"))
    try:
        assert _load(tmp_path, "  extractor: test-registered-later\n").preprocessing.extractor == (
            "test-registered-later"
        )
        assert "'test-registered-later'" in _error(tmp_path, "  extractor: nope\n")
    finally:
        unregister("test-registered-later")
    assert "got 'test-registered-later'" in _error(tmp_path, "  extractor: test-registered-later\n")


def test_schema_import_does_not_import_the_registry() -> None:
    code = "import sys, stamp.config; print('stamp.encoders' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- operating point


def test_warning_names_config_and_encoder_operating_points() -> None:
    assert _warnings(extractor="uni") == [
        "preprocessing.tile_size_um/tile_size_px = 256/224 → 1.14 µm/px, but extractor 'uni' was trained at "
        "0.5 µm/px, 224 px (tile_size_um: 112 and tile_size_px: 224 match it)"
    ]
    # the right scale at the wrong size is a mismatch too
    (text,) = _warnings(extractor="conch", tile_size_um=112, tile_size_px=224)
    assert "112/224 → 0.5 µm/px" in text and "'conch' was trained at 0.5 µm/px, 448 px" in text


@pytest.mark.parametrize("name", list(ENCODERS))
def test_no_warning_at_each_encoders_own_operating_point(name: str) -> None:
    spec = get_spec(name)
    um = spec.mpp * spec.tile_px if spec.mpp is not None else 256.0
    assert (
        _warnings(extractor=name, tile_size_um=um, tile_size_px=spec.tile_px, strict_operating_point=True)
        == []
    )
    assert check_operating_point(name, um, spec.tile_px) is None


def test_strict_makes_it_a_one_line_config_error(tmp_path: Path) -> None:
    message = _error(tmp_path, "  extractor: uni\n  strict_operating_point: true\n")
    assert message.splitlines() == [
        f"{tmp_path / 'config.yaml'}: preprocessing: tile_size_um/tile_size_px = 256/224 → 1.14 µm/px, but "
        "extractor 'uni' was trained at 0.5 µm/px, 224 px (tile_size_um: 112 and tile_size_px: 224 match it) "
        "(strict_operating_point: true) [line 1]"
    ]
    with pytest.raises(ValidationError, match="strict_operating_point"):
        PreprocessingConfig(
            output_dir=Path("/o"), wsi_dir=Path("/w"), extractor="uni", strict_operating_point=True
        )
    cfg = _load(tmp_path, "  extractor: uni\n  tile_size_um: 112\n  strict_operating_point: true\n")
    assert cfg.preprocessing is not None and cfg.preprocessing.tile_size_um == 112


#: STAMP's default tiles (256 µm at 224 px = 1.14 µm/px) per encoder family, as CONTRIBUTING and the
#: template say: quiet where the encoder's declared mpp is within 1.2x of 1.14 (ctranspath: 1.0, demo)
#: or unknown (mpp None); a warning for the 0.5 µm/px encoders, and for those that want other tile px.
STAMP_DEFAULTS_WARN = {
    "ctranspath": False,
    "chief-ctranspath": False,
    "demo": False,
    "empty": False,
    "keep": False,
    "dino-bloom": False,
    "red-dino": False,
    "uni": True,
    "virchow2": True,
    "gigapath": True,
    "conch": True,
    "conch1_5": True,
    "musk": True,
    "plip": True,
    "ticon": True,
}


@pytest.mark.parametrize(("name", "warns"), sorted(STAMP_DEFAULTS_WARN.items()))
def test_stamp_default_tiles_per_family(name: str, warns: bool, tmp_path: Path) -> None:
    assert bool(_warnings(extractor=name)) is warns
    if warns:
        assert "strict_operating_point: true" in _error(
            tmp_path, f"  extractor: {name}\n  strict_operating_point: true\n"
        )
    else:
        _load(tmp_path, f"  extractor: {name}\n  strict_operating_point: true\n")


def test_stamp_defaults_cover_every_family() -> None:
    families = {get_spec(n).family for n in STAMP_DEFAULTS_WARN}
    builtin = {s.family for s in ENCODERS.values() if not s.name.startswith("test-")}
    assert families == builtin


def test_cli_logs_the_warning_as_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(HEAD + "  extractor: uni\n")
    out = subprocess.run(
        [sys.executable, "-m", "stamp.cli", "-c", str(cfg), "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "tile_size_um/tile_size_px" in line]
    assert len(lines) == 1 and " WARNING preprocessing.tile_size_um/tile_size_px = 256/224" in lines[0]
    assert "warnings.warn" not in out.stderr
