"""Per-output lock files so several runs on one output folder share the work.

A lock is ``<output>.lock`` created with ``O_EXCL`` and holding the owner's host, PID and
start time. A lock is *stale* when its owner is on this host and no longer running, or
when it is older than ``stale_after_s`` (owners on other hosts cannot be checked); a
stale lock is taken over. ``kill -9`` therefore leaves a lock that the next run on this
host removes at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stamp.fileio import pid_alive

DEFAULT_STALE_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock."""

    host: str
    pid: int
    started: float

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
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(owner: LockOwner | None, lock_path: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> bool:
    """True when the lock's owner is gone (same host) or the lock is older than ``stale_after_s``."""
    if owner is None:  # unreadable: stale once it is older than a few seconds (writer died mid-write)
        try:
            return time.time() - lock_path.stat().st_mtime > 10
        except FileNotFoundError:
            return True
    if owner.host == socket.gethostname() and not pid_alive(owner.pid):
        return True
    return time.time() - owner.started > stale_after_s


class OutputLock:
    """Context manager: hold ``<output>.lock`` while producing ``output``.

    Raises :class:`SlideLocked` on enter when a live process holds the lock.
    """

    def __init__(self, output: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.output = Path(output)
        self.lock_path = self.output.with_name(self.output.name + ".lock")
        self.stale_after_s = stale_after_s
        self._held = False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; raise :class:`SlideLocked` if it is held."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(self.lock_path)
                if not is_stale(owner, self.lock_path, self.stale_after_s):
                    assert owner is not None
                    raise SlideLocked(self.output, owner) from None
                self.lock_path.unlink(missing_ok=True)  # stale: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._held = True
            return
        owner = read_owner(self.lock_path) or LockOwner("?", -1, time.time())
        raise SlideLocked(self.output, owner)

    def release(self) -> None:
        """Remove the lock if we hold it."""
        if self._held:
            owner = read_owner(self.lock_path)
            if owner is None or (owner.pid == os.getpid() and owner.host == socket.gethostname()):
                self.lock_path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
