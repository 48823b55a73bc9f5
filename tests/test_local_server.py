"""The local Prefect server that commands start and reuse (issue #17): found, started once under
concurrency, stopped when idle, a stale record replaced, a lean restart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stamp.fileio import process_start_ticks
from stamp_flows import server_process
from stamp_flows.server import (
    SERVER_FILE,
    find_or_start_server,
    record_is_live,
    recorded_server,
    server_is_healthy,
    stop_server,
    wait_healthy,
)
from tests.conftest import REPO_ROOT

STAMP = str(Path(sys.executable).with_name("stamp"))

# a command's client side, as the CLI runs it: find or start the server, wait, run one flow
CLIENT = r"""
import os, sys, time
from stamp_flows.runtime import configure_prefect
target = configure_prefect()
from prefect import flow
@flow(name="probe")
def probe():
    return 42
target.wait_ready()
assert probe() == 42
print(target.mode, target.api_url, os.getpid(), flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="WARNING", **extra)
    return env


def _server_processes(home: Path) -> list[int]:
    """PIDs of server processes whose environment names ``home`` as PREFECT_HOME."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"stamp_flows.server_process" in cmd and f"PREFECT_HOME={home}\0".encode() in env:
            pids.append(int(entry.name))
    return pids


def _wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def home(tmp_path: Path):  # noqa: ANN201
    folder = tmp_path / "prefect-home"
    folder.mkdir(mode=0o700)
    yield folder
    stop_server(folder)


@pytest.mark.slow  # starts a server (~30-60 s on 2 cores)
def test_two_commands_starting_at_once_start_one_server_that_a_third_reuses(home: Path) -> None:
    env = _env(home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0][:2] == outs[1][:2] and outs[0][0] == "local-server", outs
    record = recorded_server(home)
    assert record is not None and record["api_url"] == outs[0][1]
    assert _server_processes(home) == [record["pid"]], "exactly one server for this PREFECT_HOME"
    third = subprocess.run(
        [sys.executable, "-c", CLIENT], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.split()[1] == record["api_url"] and _server_processes(home) == [record["pid"]]


@pytest.mark.slow  # starts a server (~30-60 s on 2 cores)
def test_stamp_v_prints_the_timing_line_and_reuses_the_server(home: Path, tmp_path: Path) -> None:
    preds = tmp_path / "preds.csv"
    rows = ["PATIENT,isMSIH,pred,isMSIH_MSIH,isMSIH_nonMSIH,loss"]
    rows += [
        f"P{i},{'MSIH' if i % 2 else 'nonMSIH'},MSIH,{0.3 + 0.4 * (i % 2):.2f},0.5,0.5" for i in range(20)
    ]
    preds.write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"statistics:\n  output_dir: {tmp_path / 'stats'}\n  pred_csvs: [{preds}]\n"
        "  ground_truth_label: isMSIH\n  true_class: MSIH\n"
    )
    env = _env(home)
    timing = re.compile(
        r"timing: start-up [0-9.]+ s · API [0-9.]+ s · flow ([0-9.]+) s · write-out [-0-9.]+ s"
    )
    servers = []
    for _ in range(2):
        out = subprocess.run(
            [STAMP, "-v", "-c", str(cfg), "statistics"], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        found = timing.search(out.stderr)
        assert found and float(found.group(1)) > 0, out.stderr[-2000:]
        record = recorded_server(home)
        assert record is not None and record_is_live(record), "the command left its server running"
        servers.append(record["pid"])
    assert (tmp_path / "stats").is_dir()
    log = (tmp_path / "stats" / "logfile.log").read_text()
    assert len(re.findall(r"statistics: \d+ files in ", log)) == 2, "both runs' last log line is in the file"
    assert servers[0] == servers[1] and _server_processes(home) == servers[:1], "the second command reused it"


@pytest.mark.slow  # starts a server (~30-60 s on 2 cores)
def test_idle_server_stops_only_when_no_command_holds_it(home: Path) -> None:
    env = _env(home, STAMP_SERVER_IDLE_MINUTES="0.05")  # 3 s; checked every CHECK_EVERY_S
    holder = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "15"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    _wait_until(
        lambda: server_is_healthy(str((recorded_server(home) or {}).get("api_url", ""))), 240, "a server"
    )
    record = recorded_server(home)
    assert record is not None
    line = holder.stdout.readline() if holder.stdout else ""
    assert line.startswith("local-server"), line
    time.sleep(2 * server_process.CHECK_EVERY_S)  # idle for longer than 3 s, but a command holds the lock
    assert record_is_live(record) and server_is_healthy(record["api_url"])
    holder.wait(timeout=60)
    _wait_until(lambda: not record_is_live(record), 60, "the idle server to exit")
    assert not (home / SERVER_FILE).exists(), "an idle server removes its record"


def test_stale_record_is_replaced_and_a_live_one_reused(home: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, started in ((dead.pid, None), (os.getpid(), 1)):  # a dead PID; a live PID of another process
        info = {"api_url": "http://127.0.0.1:9/api", "ui_url": "http://127.0.0.1:9", "pid": pid}
        if started is not None:
            info["started"] = started
        (home / SERVER_FILE).write_text(json.dumps(info))
        (home / SERVER_FILE).chmod(0o600)
        spawned = find_or_start_server(home, idle_timeout=0)
        try:
            assert spawned.proc is not None, f"a record naming pid {pid} was trusted"
            assert spawned.api_url != info["api_url"]
            record = recorded_server(home)
            assert record is not None and record["pid"] == spawned.pid
            assert record["started"] == process_start_ticks(spawned.pid)
            again = find_or_start_server(home, idle_timeout=0)
            assert again.proc is None and again.pid == spawned.pid, "a live record is reused, not replaced"
        finally:
            stop_server(home)
        assert spawned.proc.wait(timeout=30) is not None


def test_a_server_that_dies_while_starting_is_reported_with_its_log(home: Path) -> None:
    spawned = find_or_start_server(home, idle_timeout=0)
    assert spawned.proc is not None
    spawned.proc.kill()
    with pytest.raises(RuntimeError, match=r"exited; see .*stamp-server\.log"):
        wait_healthy(spawned, timeout=60)


def test_lean_start_marker_skips_migrations_only_for_the_same_version_and_database(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    assert server_process.lean_start_settings(home) == {}, "no marker: migrate"
    (home / "prefect.db").write_bytes(b"")
    marker = server_process._marker(home)
    (home / server_process.MARKER_FILE).write_text(json.dumps(marker))
    assert server_process.lean_start_settings(home) == {
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    }
    (home / server_process.MARKER_FILE).write_text(json.dumps({**marker, "prefect": "0.0.1"}))
    assert server_process.lean_start_settings(home) == {}, "another Prefect version: migrate"
    (home / server_process.MARKER_FILE).write_text(json.dumps(marker))
    (home / "prefect.db").unlink()
    (home / "prefect.db").write_bytes(b"")  # a new database file (e.g. deleted and recreated)
    replaced = server_process._marker(home)
    if replaced["file"] != marker["file"]:
        assert server_process.lean_start_settings(home) == {}, "another database file: migrate"
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "postgresql+asyncpg://p@db/prefect")
    assert server_process.lean_start_settings(home) == {}, "another database: migrate"


def test_commands_without_work_import_neither_prefect_nor_torch(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("preprocessing:\n  output_dir: out\n  wsi_dir: slides\n  extractor: uni\n")
    code = (
        "import sys\n"
        "from stamp.cli import main\n"
        f"assert main(['-c', {str(cfg)!r}, 'config']) == 0\n"
        "assert 'prefect' not in sys.modules\n"
        "import stamp_flows.preprocess\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_record_of_another_machine_sharing_the_home_is_left_alone(home: Path) -> None:
    """An NFS home on a cluster: another node's server is neither reused (its PID means nothing here),
    nor replaced, nor stopped; the command falls back to a temporary API."""
    info = {"api_url": "http://127.0.0.1:9/api", "ui_url": "http://127.0.0.1:9", "pid": os.getpid()}
    info |= {"started": process_start_ticks(os.getpid()), "host": "another-node.cluster"}
    (home / SERVER_FILE).write_text(json.dumps(info))
    (home / SERVER_FILE).chmod(0o600)
    before = (home / SERVER_FILE).read_bytes()
    assert find_or_start_server(home, idle_timeout=0) is None
    assert stop_server(home) is False
    assert (home / SERVER_FILE).read_bytes() == before
    code = "from stamp_flows.runtime import configure_prefect\nprint(configure_prefect().mode)\n"
    out = subprocess.run([sys.executable, "-c", code], env=_env(home), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[-1] == "embedded", out.stderr[-2000:]
    assert "another machine" in out.stderr
    assert _server_processes(home) == []
