"""The ``stamp`` command line: help, init, config, unbuilt stages, error texts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stamp.cli import EXIT_NOT_BUILT, main
from stamp.stages import STAGES


def test_help_lists_stamp_commands_and_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from stamp.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'prefect', 'pydantic', 'pandas', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
    for command in ["init", "config", *(s.name for s in STAGES), "demo", "synth", "server", "encoders"]:
        assert f"    {command}" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    assert "usage: stamp" in capsys.readouterr().out


def test_init_writes_template_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.yaml"
    assert main(["-c", str(cfg), "init"]) == 0
    text = cfg.read_text()
    assert "preprocessing:" in text and "tile_size_um" in text and "#" in text
    cfg.write_text(text + "# my edits\n")
    assert main(["-c", str(cfg), "init"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and str(cfg) in err
    assert cfg.read_text().endswith("# my edits\n"), "init must not overwrite an existing config"


def test_config_prints_validated_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "preprocessing:\n  output_dir: out\n  wsi_dir: slides\n  extractor: uni\n"
        "crossval:\n  output_dir: cv\n  clini_table: c.csv\n  slide_table: s.csv\n"
        "  feature_dir: f\n  ground_truth_label: isMSIH\n"
    )
    assert main(["-c", str(cfg), "config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preprocessing"]["extractor"] == "uni"
    assert printed["preprocessing"]["tile_size_um"] == 256.0  # STAMP default filled in
    assert printed["crossval"]["n_splits"] == 5


def test_config_typo_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("preprocessing:\n  output_dir: o\n  wsi_dir: w\n  extractor: uni\n  tile_size_pxx: 224\n")
    assert main(["-c", str(cfg), "config"]) == 1
    err = capsys.readouterr().err.strip()
    assert "preprocessing.tile_size_pxx" in err and "tile_size_px" in err and "config.yaml" in err
    assert "Traceback" not in err


def test_missing_config_names_file_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(tmp_path / "nope.yaml"), "config"]) == 1
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "stamp init" in err


@pytest.mark.parametrize("command", sorted(s.name for s in STAGES if not s.built))
def test_unbuilt_stage_exits_2_without_outputs(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([command]) == EXIT_NOT_BUILT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not built yet" in err[0] and command in err[0]
    assert list(tmp_path.iterdir()) == [], "an unbuilt stage must not write anything"


def test_console_script_entry_point() -> None:
    exe = Path(sys.executable).with_name("stamp")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: stamp" in proc.stdout


def test_console_script_quick_exit_keeps_status_output_and_log(tmp_path: Path) -> None:
    """The console script ends with os._exit after the exit handlers: the status and every printed line
    must be complete, as with a normal exit (the log file: tests/test_local_server.py)."""
    exe = Path(sys.executable).with_name("stamp")
    bad = subprocess.run(
        [str(exe), "-c", str(tmp_path / "nope.yaml"), "config"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "nope.yaml" in bad.stderr and "stamp init" in bad.stderr
    cfg = tmp_path / "config.yaml"
    cfg.write_text("preprocessing:\n  output_dir: out\n  wsi_dir: slides\n  extractor: uni\n")
    good = subprocess.run([str(exe), "-c", str(cfg), "config"], capture_output=True, text=True)
    assert good.returncode == 0 and yaml.safe_load(good.stdout)["preprocessing"]["extractor"] == "uni"
    assert good.stdout.endswith("\n")
