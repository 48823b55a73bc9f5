"""Per-output lock files so several runs on one output folder share the work.

A lock is ``<output>.lock``, held with ``flock()`` on an open file for as long as the output is
being written, and holding the owner's host, PID, kernel boot and start time (for messages). The
kernel releases a flock when its process dies, whatever the PID namespace (``kill -9``, a stopped
container), so on one kernel a lock is held exactly while its owner lives: nothing to judge by
PIDs, no two takers of a stale lock. A lock recorded by a process on another kernel (another node
on a shared filesystem, whose flocks we may not see) is respected until it is older than
``stale_after_s``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stamp.fileio import BOOT_ID

DEFAULT_STALE_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock."""

    host: str
    pid: int
    started: float
    boot: str = ""

    def describe(self) -> str:
        """e.g. ``pid 123 on host gpu01 since 12:00:01``."""
        return f"pid {self.pid} on host {self.host} since {time.strftime('%H:%M:%S', time.localtime(self.started))}"


class SlideLocked(RuntimeError):
    """The output is being written by another live process."""

    def __init__(self, path: Path, owner: LockOwner) -> None:
        super().__init__(f"{path.name}: being processed by {owner.describe()}")
        self.path, self.owner = path, owner


def read_owner(lock_path: Path) -> LockOwner | None:
    """The owner recorded in a lock file, or None if it is unreadable/half-written."""
    try:
        data = json.loads(lock_path.read_text())
        return LockOwner(
            str(data["host"]), int(data["pid"]), float(data["started"]), str(data.get("boot", ""))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


class OutputLock:
    """Context manager: hold ``<output>.lock`` while producing ``output``.

    Raises :class:`SlideLocked` on enter when a live process holds the lock.
    """

    def __init__(self, output: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.output = Path(output)
        self.lock_path = self.output.with_name(self.output.name + ".lock")
        self.stale_after_s = stale_after_s
        self._fd: int | None = None

    def _open_locked(self) -> int | None:
        """An fd of the lock file at ``lock_path`` that we hold the flock of, or None if someone holds it."""
        while True:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the holder released (and removed) it between our open and flock: again

    def acquire(self) -> None:
        """Take the lock; raise :class:`SlideLocked` if a live process holds it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open_locked()
        if fd is None:
            raise SlideLocked(self.output, read_owner(self.lock_path) or LockOwner("?", -1, time.time()))
        recorded = read_owner(self.lock_path)
        if (
            recorded is not None
            and recorded.boot != BOOT_ID
            and time.time() - recorded.started <= self.stale_after_s
        ):
            os.close(fd)  # another node's lock: its flock may not reach us, so trust its age
            raise SlideLocked(self.output, recorded)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "boot": BOOT_ID}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and let go of the lock, if we hold it."""
        if self._fd is not None:
            self.lock_path.unlink(missing_ok=True)  # while still holding the flock
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
