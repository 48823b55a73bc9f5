"""File-system primitives every stage writes through: durable atomic files and folders, temp sweeping.

Contract 6: nothing partial is left where a finished output is expected.

* :func:`atomic_path` yields an unpredictable temp name beside the target (``mkstemp``: ``O_EXCL``,
  so a planted symlink is never followed); on success the temp file is fsynced, renamed over the
  target and the folder fsynced, so after a crash or power loss a reader sees the old file or the
  whole new one.
* :func:`staging_dir` + :func:`publish_dir` do the same for a folder: it is built under a temp
  name and swapped into place in one ``renameat2(RENAME_EXCHANGE)`` where the kernel has it.
* Every temp name carries :data:`TEMP_TAG`, a hash of this host, boot and PID namespace and the writer's PID, so
  :func:`sweep_temps` can remove what a killed run left behind (its writer is gone, or it is
  older than the stage's lock lifetime) and nothing else.

Whether an existing output may be replaced at all is decided by :mod:`stamp.provenance`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_logger = logging.getLogger("stamp")

TEMP_TAG = "stamp-tmp"
OLD_TAG = "stamp-old"
#: Temp files older than this are swept even when their writer cannot be checked (another host).
DEFAULT_TEMP_LIFETIME_S = 24 * 3600.0


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "?"


#: This kernel's boot: processes that share it see the same flock()s.
BOOT_ID = _boot_id()


def _process_space_tag() -> str:
    """Eight hex digits naming where our PIDs mean something: host name, boot and PID namespace.

    Two containers may share a host name (``--network host``, SLURM nodes with one image); their PIDs
    are only comparable when the boot and the PID namespace are the same too.
    """
    parts = [socket.gethostname(), BOOT_ID]
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        parts.append("?")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


#: Where this process's PID can be judged by others: same value = same host, boot and PID namespace.
PROCESS_SPACE = _process_space_tag()
_TEMP_RE = re.compile(rf"^\..*\.(?:{TEMP_TAG}|{OLD_TAG})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[^/]*$")
_MAX_NAME = 120  # room for the tag, host, pid and mkstemp's random part within NAME_MAX (255)


def temp_prefix(name: str, tag: str = TEMP_TAG) -> str:
    """Prefix of a hidden temp name for ``name``: ``.<name>.<tag>-<host>-<pid>-`` (random part follows)."""
    return f".{name[:_MAX_NAME]}.{tag}-{PROCESS_SPACE}-{os.getpid()}-"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or folder's data and metadata to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and folder under ``root`` (before a folder is published)."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` durably, on error it is removed.

    The file gets the usual permissions (``0o666`` minus the umask) unless ``mode`` is given, not
    ``mkstemp``'s private ``0o600``: outputs written by a container's user must stay readable on the host.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target.name))
    os.fchmod(fd, _FILE_MODE if mode is None else mode)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably; return the path."""
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def staged_file(final: str | os.PathLike[str]) -> Path:
    """A new empty temp file beside ``final`` (normal permissions), for a caller that publishes it itself."""
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target.name))
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


@contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new empty temp folder beside ``final``; it is removed on error (not on success).

    Fill it, then hand it to :func:`publish_dir` (which consumes it).
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name)))
    os.chmod(tmp, _DIR_MODE)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_libc: ctypes.CDLL | None = None


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(staging: Path, final: Path) -> None:
    """Put the folder ``staging`` at ``final`` (replacing what is there) and fsync it.

    The caller decides that replacing ``final`` is allowed (:mod:`stamp.provenance`). An existing
    folder is swapped out in one atomic exchange and then removed; without ``renameat2`` it is
    renamed aside first (a reader may then briefly find no folder, never a partial one).
    """
    fsync_tree(staging)
    if final.is_dir() and not final.is_symlink():
        if _renameat2_exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final.name, OLD_TAG)))
            os.replace(final, old)  # onto the empty folder we just made
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_path(final.parent)


def _writer_gone(host: str, pid: int) -> bool:
    return host == PROCESS_SPACE and pid != os.getpid() and not pid_alive(pid)


def sweep_temps(
    root: str | os.PathLike[str], *, recursive: bool = True, lifetime_s: float = DEFAULT_TEMP_LIFETIME_S
) -> list[Path]:
    """Remove temp files and folders of ours under ``root`` whose writer is gone; return what went.

    A temp entry is ours when its name has the :func:`temp_prefix` form and it belongs to this
    user. It is removed when its writer ran on this host and no longer runs (``kill -9``), or when
    it is older than ``lifetime_s`` (writers on other hosts cannot be checked). Nothing else is touched.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    removed: list[Path] = []
    now, me = time.time(), os.geteuid()
    for folder, dirs, files in os.walk(base):
        for name in [*dirs, *files]:
            m = _TEMP_RE.match(name)
            if m is None:
                continue
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if st.st_uid != me:
                continue
            if not (_writer_gone(m["host"], int(m["pid"])) or now - st.st_mtime > lifetime_s):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirs[:] = [d for d in dirs if recursive and not _TEMP_RE.match(d)]
    if removed:
        _logger.info("removed %d temp file(s) left by an interrupted run under %s", len(removed), base)
    return removed


def make_private_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` and its missing parents with mode 0700; folders that exist are left as they are."""
    missing: list[Path] = []
    probe = Path(path)
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to chmod (callers check it)
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask


def unsafe_folder_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a folder only this user can write (a symlink, not a folder, another
    owner, group/other-writable), or None when it is one."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this host (or we may not signal it)."""
    if pid <= 0:
        return True  # never a real writer: do not treat it as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22), or None if gone.

    With the PID it identifies a process across PID reuse: a record naming a PID whose start time
    differs is another process's.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def private_file_text(path: str | os.PathLike[str]) -> str | None:
    """The stripped text of ``path`` if it is a regular file of this user that no one else can read or
    write (no symlink followed), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        return fh.read().strip() or None


def open_append_nofollow(path: str | os.PathLike[str]) -> int:
    """An fd for appending to ``path`` that refuses a symlink at the final component (logs)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, _FILE_MODE)
