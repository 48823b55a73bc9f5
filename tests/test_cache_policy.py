"""The Prefect cache policy of DESIGN contract 4, exercised through real flow runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("prefect_api")


def _executions(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_cache_hits_moves_and_misses_changes(tmp_path: Path) -> None:
    from tests.cache_probe import probe_flow

    slide = tmp_path / "slide.svs"
    slide.write_bytes(os.urandom(200_000))
    out, counter = tmp_path / "out.txt", tmp_path / "count.txt"
    assert probe_flow(str(slide), 256.0, str(out), str(counter)) == str(out)
    assert _executions(counter) == 1
    probe_flow(str(slide), 256.0, str(out), str(counter))
    assert _executions(counter) == 1, "unchanged slide and parameters must be served from the cache"

    moved = tmp_path / "elsewhere" / "renamed.svs"
    moved.parent.mkdir()
    slide.rename(moved)
    probe_flow(str(moved), 256.0, str(out), str(counter))
    assert _executions(counter) == 1, "a moved/renamed slide must hit the cache"

    probe_flow(str(moved), 512.0, str(out), str(counter))
    assert _executions(counter) == 2, "a changed parameter must miss"

    data = bytearray(moved.read_bytes())
    data[100] ^= 0x01
    moved.write_bytes(bytes(data))
    probe_flow(str(moved), 256.0, str(out), str(counter))
    assert _executions(counter) == 3, "one changed byte must miss"

    out.unlink()
    probe_flow(str(moved), 256.0, str(out), str(counter))
    assert _executions(counter) == 4 and out.exists(), "a deleted output must be recomputed"
    probe_flow(str(moved), 256.0, str(out), str(counter))
    assert _executions(counter) == 4


def test_two_processes_compute_once(tmp_path: Path, prefect_api: str) -> None:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    slide = tmp_path / "slide.svs"
    slide.write_bytes(os.urandom(100_000))
    out, counter = tmp_path / "out.txt", tmp_path / "count.txt"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        "PYTHONPATH": str(REPO_ROOT),
    }
    cmd = [sys.executable, "-m", "tests.cache_probe", str(slide), "256", str(out), str(counter), "4"]
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
        assert stdout.strip().splitlines()[-1] == str(out)
    assert _executions(counter) == 1, "two processes with the same key must compute once"


@pytest.mark.timeout(240)
def test_lock_of_killed_process_does_not_block(tmp_path: Path, prefect_api: str) -> None:
    """kill -9 while a task holds its cache lock; the next run must still compute (not hang)."""
    import time

    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    from tests.cache_probe import probe_flow

    slide = tmp_path / "slide.svs"
    slide.write_bytes(os.urandom(50_000))
    out, counter = tmp_path / "out.txt", tmp_path / "count.txt"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        "PYTHONPATH": str(REPO_ROOT),
    }
    cmd = [sys.executable, "-m", "tests.cache_probe", str(slide), "256", str(out), str(counter), "120"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _executions(counter) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # the task body has started: the lock is held
    assert _executions(counter) == 1
    proc.kill()
    proc.wait()
    assert probe_flow(str(slide), 256.0, str(out), str(counter)) == str(out)
    assert _executions(counter) == 2


def test_lock_file_caught_mid_write_or_unstamped(tmp_path: Path) -> None:
    """Prefect creates a lock file empty, writes it, and we stamp the owner after: a reader between
    those steps sees "held" (no JSON error fails the task), and a lock left empty or unstamped by a
    process killed between them is freed once it is older than the grace period."""
    from stamp_tasks.cache import UNSTAMPED_LOCK_GRACE_S, ProcessAwareLockManager

    manager = ProcessAwareLockManager(lock_files_directory=tmp_path)
    for key, content in (
        ("empty", b""),
        ("half", b'{"holder": "x", "exp'),
        ("unstamped", b'{"holder": "x"}'),
    ):
        path = Path(manager._lock_path_for_key(key))
        path.write_bytes(content)
        assert manager.is_locked(key), key  # young: its writer may still be stamping it
        assert path.exists()
        old = path.stat().st_mtime - UNSTAMPED_LOCK_GRACE_S - 5
        os.utime(path, (old, old))
        assert not manager.is_locked(key), key  # abandoned: freed
        assert not path.exists()
        assert manager.acquire_lock(key, holder="me", acquire_timeout=1)
        assert manager.is_lock_holder(key, "me")
        manager.release_lock(key, holder="me")
