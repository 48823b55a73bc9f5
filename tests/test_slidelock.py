"""Per-output lock files: exclusive while alive, taken over when the owner is dead."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stamp.slidelock import OutputLock, SlideLocked, read_owner


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    out = tmp_path / "slide.h5"
    with OutputLock(out) as lock:
        owner = read_owner(lock.lock_path)
        assert owner is not None and owner.host == socket.gethostname()
        with pytest.raises(SlideLocked, match=r"slide\.h5: being processed by pid \d+ on host"):
            OutputLock(out).acquire()
    assert not (tmp_path / "slide.h5.lock").exists()


def test_lock_of_killed_process_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "slide.h5"
    code = (
        "import sys, time; from pathlib import Path; from stamp.slidelock import OutputLock\n"
        f"OutputLock(Path({str(out)!r})).acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(SlideLocked):
        OutputLock(out).acquire()
    proc.kill()  # like kill -9: the lock file stays behind
    proc.wait()
    assert (tmp_path / "slide.h5.lock").exists()
    with OutputLock(out):  # stale (owner dead on this host) → taken over
        assert read_owner(tmp_path / "slide.h5.lock").pid != proc.pid  # type: ignore[union-attr]


def test_old_lock_from_other_host_is_stale(tmp_path: Path) -> None:
    out = tmp_path / "slide.h5"
    lock = tmp_path / "slide.h5.lock"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    with pytest.raises(SlideLocked, match="elsewhere"):
        OutputLock(out).acquire()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time() - 7200}))
    with OutputLock(out, stale_after_s=3600):
        pass


def _unshare_pid_works() -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_pid_works(), reason="needs unshare --pid (a PID namespace)")
def test_lock_of_a_container_sharing_our_host_name_is_judged_by_the_kernel(tmp_path: Path) -> None:
    """L2: a holder in another PID namespace (same host name, its own PIDs) keeps its lock while it
    lives — its PID means nothing here — and loses it the moment it dies."""
    out = tmp_path / "slide.h5"
    code = (
        "import sys, time; from pathlib import Path; from stamp.slidelock import OutputLock\n"
        f"OutputLock(Path({str(out)!r})).acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        owner = read_owner(tmp_path / "slide.h5.lock")
        assert owner is not None and owner.host == socket.gethostname() and owner.pid < 10  # its own PIDs
        with pytest.raises(SlideLocked, match="being processed by"):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 10  # the namespace's processes die just after `unshare` itself
    while True:
        try:
            with OutputLock(out):  # the kernel dropped the dead holder's lock: taken over
                assert read_owner(tmp_path / "slide.h5.lock").pid == os.getpid()  # type: ignore[union-attr]
            break
        except SlideLocked:
            assert time.monotonic() < deadline, "the dead holder's lock was never released"
            time.sleep(0.1)
