"""``python -m stamp.encoders fetch``: lock values never reach a shell (the download tools are fakes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stamp.encoders.__main__ import main
from stamp.encoders.registry import get_spec
from stamp.encoders.weights import LockEntry, fetch_command

INJECT = "x; touch {marker} #"


def _fake_tools(tmp_path: Path, monkeypatch) -> Path:
    """``hf`` on PATH and a ``gdown`` module on PYTHONPATH that record their argv (one JSON list per line)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.jsonl"
    bin_dir.mkdir()
    record = f"import json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
    hf = bin_dir / "hf"
    hf.write_text(f"#!{sys.executable}\n{record}")
    hf.chmod(0o755)
    (bin_dir / "gdown").mkdir()
    (bin_dir / "gdown" / "__main__.py").write_text(record)
    (bin_dir / "gdown" / "__init__.py").write_text("")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(bin_dir))
    return log


def _lock(tmp_path: Path, monkeypatch, name: str, entry: dict) -> None:
    p = tmp_path / "lock.json"
    p.write_text(json.dumps({"format": 1, "encoders": {name: entry}}))
    monkeypatch.setenv("STAMP_WEIGHTS_LOCK", str(p))


@pytest.mark.parametrize("key", ["repo", "revision"])
def test_printed_hf_command_is_safe_to_paste(tmp_path, monkeypatch, key):
    marker = tmp_path / "MARKER"
    log = _fake_tools(tmp_path, monkeypatch)
    values = {
        "hf_repo": "org/model",
        "revision": "0" * 40,
        key.replace("repo", "hf_repo"): INJECT.format(marker=marker),
    }
    entry = LockEntry("uni", {"pytorch_model.bin": None}, values["hf_repo"], values["revision"])
    cmd = fetch_command(get_spec("uni"), tmp_path / "w", entry=entry).split(", run: ")[-1]
    subprocess.run(["bash", "-c", cmd], check=True, env=os.environ)
    assert not marker.exists()
    (argv,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert INJECT.format(marker=marker) in argv  # one argument, verbatim


def test_gdrive_id_with_shell_syntax_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "MARKER"
    log = _fake_tools(tmp_path, monkeypatch)
    _lock(
        tmp_path,
        monkeypatch,
        "ctranspath",
        {"url": "gdrive:" + INJECT.format(marker=marker), "files": {"ctranspath.pth": None}},
    )
    assert main(["fetch", "ctranspath", "--weights-dir", str(tmp_path / "w"), "--run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'ctranspath'" in err and "STAMP_WEIGHTS_LOCK" in err
    assert not marker.exists() and not log.exists()


@pytest.mark.parametrize(
    "key,value", [("repo", "org/m; touch M"), ("revision", "--help"), ("url", "-o/etc/x")]
)
def test_lock_source_values_must_be_plain(tmp_path, monkeypatch, key, value):
    from stamp.encoders.weights import load_lock

    entry = {"repo": "org/m", "revision": "main", "files": {"a.bin": None}}
    if key == "url":
        entry = {"url": value, "files": {"a.bin": None}}
    else:
        entry[key] = value
    with pytest.raises(ValueError, match=f"{key} .* is not a valid"):
        load_lock({"format": 1, "encoders": {"uni": entry}})


def test_gdrive_fetch_runs_the_tool_without_a_shell(tmp_path, monkeypatch):
    log = _fake_tools(tmp_path, monkeypatch)
    _lock(tmp_path, monkeypatch, "ctranspath", {"url": "gdrive:1AbC_d-E", "files": {"ctranspath.pth": None}})
    assert main(["fetch", "ctranspath", "--weights-dir", str(tmp_path / "w"), "--run"]) == 0
    (argv,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert argv[1:] == ["1AbC_d-E", "-O", str(tmp_path / "w" / "ctranspath" / "ctranspath.pth")]
    assert (tmp_path / "w" / "ctranspath").is_dir()
