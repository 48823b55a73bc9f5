"""Prefect cache policy for per-slide (and per-fold) stage tasks — DESIGN contract 4.

The key is :func:`stamp.hashing.stage_cache_key` over

* the *content* sha256 of the file arguments named in ``content_args`` (memoised per
  device + inode + size + mtime + ctime (private index) by :class:`stamp.hashing.DigestIndex`, so a cohort is hashed once
  and a renamed or moved slide still hits),
* every other argument (the stage parameters), minus ``ignore_args``,
* the task name, an explicit ``code_version`` and the encoder ``weights_sha256``.

A cache hit is only an index entry "this key was computed, here are its paths": before a
cached result is served, :func:`served_or_recomputed` checks the outputs' own provenance
(:mod:`stamp.provenance`) and re-runs the task with ``refresh_cache`` when they are not what
this run would write (the record is then overwritten under the same key).

Use :func:`content_cache_policy` to get the policy with SERIALIZABLE isolation and a
file-system lock manager, so two processes computing the same key run it once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.locking.filesystem import FileSystemLockManager

from stamp.fileio import PROCESS_SPACE, atomic_write_text, pid_alive
from stamp.hashing import DigestIndex, default_index_dir, stage_cache_key
from stamp.logs import logger
from stamp.provenance import Check

R = TypeVar("R")


@dataclass
class ContentStageCache(CachePolicy):
    """Cache key = file contents + stage parameters + task name + code/weights version."""

    code_version: str = "0"
    weights_sha256: str | None = None
    content_args: tuple[str, ...] = ("slide_path",)
    ignore_args: tuple[str, ...] = ()
    digest_index_dir: str | None = None
    _index: DigestIndex | None = field(default=None, repr=False, compare=False)

    def _digests(self, value: Any) -> list[str]:
        index = self._index or DigestIndex(self.digest_index_dir)
        self._index = index
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            return [d for v in value for d in self._digests(v)]
        return [index.sha256(value)]

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        """Return the cache key of one task call."""
        content: list[str] = []
        for name in self.content_args:
            if name not in inputs:
                raise KeyError(f"cache policy of task {task_ctx.task.name!r} expects an argument {name!r}")
            content.extend(self._digests(inputs[name]))
        params = {k: v for k, v in inputs.items() if k not in self.content_args and k not in self.ignore_args}
        return stage_cache_key(
            task_name=task_ctx.task.name,
            content_sha256=content,
            params=params,
            code_version=self.code_version,
            weights_sha256=self.weights_sha256,
        )


UNSTAMPED_LOCK_GRACE_S = 30.0
"""Seconds after which a lock file without an owner stamp counts as abandoned (its writer died)."""


class ProcessAwareLockManager(FileSystemLockManager):
    """Prefect's file-system lock manager, plus: a lock dies with the process that took it.

    Prefect's transactions take locks without a hold timeout, so a process killed with
    ``kill -9`` mid-task would leave a lock that blocks every later run of that key for
    ever. We record host, PID and process space (host, boot and PID namespace) in each lock
    file; a lock whose owner is in our process space and no longer running counts as free (and is
    removed). A lock of another container sharing our host name is never judged by our PIDs.
    """

    def _stamp_owner(self, key: str) -> None:
        path = Path(self._lock_path_for_key(key))
        try:
            data = json.loads(path.read_bytes() or b"{}")
        except (OSError, ValueError):
            return
        data.update(pid=os.getpid(), host=socket.gethostname(), space=PROCESS_SPACE)
        atomic_write_text(path, json.dumps(data))

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """Take the lock as Prefect does, then record this process as its owner."""
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._stamp_owner(key)
        return acquired

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        """Async variant of :meth:`acquire_lock`."""
        acquired = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._stamp_owner(key)
        return acquired

    def _owner_is_dead(self, key: str) -> bool:
        path = Path(self._lock_path_for_key(key))
        try:
            raw, written = path.read_bytes(), path.stat().st_mtime
        except OSError:
            return False
        try:
            data = json.loads(raw)
            pid, space = int(data["pid"]), str(data["space"])
        except (ValueError, KeyError, TypeError):
            # Prefect creates the file empty, then writes it; we stamp the owner right after. A lock
            # still empty or unstamped long after it was written lost its process in between.
            return time.time() - written > UNSTAMPED_LOCK_GRACE_S
        if space != PROCESS_SPACE or pid == os.getpid():
            return False
        return not pid_alive(pid)

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        """Prefect's reader, except that a lock file caught between its creation and its first
        write (empty or half-written) reads as held by someone else instead of raising."""
        try:
            return super()._get_lock_info(key, use_cache=use_cache)
        except ValueError:
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    async def _aget_lock_info(self, key: str, use_cache: bool = True) -> Any:
        """Async variant of :meth:`_get_lock_info`."""
        try:
            return await super()._aget_lock_info(key, use_cache=use_cache)
        except ValueError:
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        """Prefect's check, except that a lock of a dead local process is removed and reported free."""
        if not use_cache and self._owner_is_dead(key):
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def default_lock_dir() -> Path:
    """Lock files for cache isolation: beside the digest index (``$STAMP_CACHE_DIR/locks``)."""
    return default_index_dir().parent / "locks"


def content_cache_policy(
    code_version: str,
    *,
    weights_sha256: str | None = None,
    content_args: tuple[str, ...] = ("slide_path",),
    ignore_args: tuple[str, ...] = (),
    lock_dir: str | Path | None = None,
    digest_index_dir: str | Path | None = None,
) -> CachePolicy:
    """A :class:`ContentStageCache` with SERIALIZABLE isolation and file locks.

    Processes sharing ``lock_dir`` (and the result storage) compute each key once; the
    others wait for the lock and then read the cached result.
    """
    policy = ContentStageCache(
        code_version=code_version,
        weights_sha256=weights_sha256,
        content_args=content_args,
        ignore_args=ignore_args,
        digest_index_dir=str(digest_index_dir) if digest_index_dir is not None else None,
    )
    locks = Path(lock_dir) if lock_dir is not None else default_lock_dir()  # created on first lock
    return policy.configure(
        isolation_level="SERIALIZABLE",
        lock_manager=ProcessAwareLockManager(lock_files_directory=locks),
    )


def served_or_recomputed(
    future: PrefectFuture[R], verify: Callable[[R], Check], recompute: Callable[[], PrefectFuture[R]]
) -> R:
    """The future's result; a *cached* result is served only if ``verify(result)`` says REUSE.

    Otherwise the task is submitted again with ``refresh_cache`` (``recompute``), whose body checks
    the outputs on disk itself and computes what is not reusable.
    """
    future.wait()
    value = future.result()
    if future.state.name != "Cached":
        return value
    check = verify(value)
    if check.reusable:
        return value
    logger.info("cached result not served: %s; computing again", check.reason)
    return recompute().result()
