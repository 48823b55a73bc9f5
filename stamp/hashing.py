"""Content digests and cache keys (DESIGN contract 4), free of any Prefect import.

* :func:`file_sha256` streams a file through sha256.
* :class:`DigestIndex` memoises a file's sha256 per inode identity (device, inode, size,
  mtime, ctime) in a small private on-disk index, guarded by a per-file lock so that
  concurrent processes hash a slide once and the others read the result.
* :func:`stage_cache_key` combines content digest, stage parameters, task name, code
  version and weights digest into one key, so a moved slide hits and a changed
  parameter misses.
* :func:`code_hash` fingerprints source files (the stage's "code version").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stamp.fileio import make_private_dir, unsafe_folder_reason

_logger = logging.getLogger("stamp")

_CHUNK = 8 * 1024 * 1024
#: 2: entries keyed by (st_dev, st_ino) and valid for (dev, ino, size, mtime_ns, ctime_ns); private dirs.
INDEX_FORMAT = 2
_IDENT_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")
_MAX_ENTRY_BYTES = 4096
#: Index directories already reported as unsafe (one warning per directory and process).
_warned_dirs: set[str] = set()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's bytes, read in 8 MiB chunks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def default_index_dir() -> Path:
    """Where slide digests are memoised unless configured: ``$STAMP_CACHE_DIR/digests``.

    ``STAMP_CACHE_DIR`` defaults to ``$XDG_CACHE_HOME/stamp`` or ``~/.cache/stamp``.
    """
    base = os.environ.get("STAMP_CACHE_DIR")
    if base:
        return Path(base) / "digests"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "stamp" / "digests"


@dataclass(frozen=True)
class Digest:
    """A file's sha256 and whether this call computed it (False: read from the index)."""

    sha256: str
    computed: bool


def _identity(path: Path) -> dict[str, int]:
    """What must be unchanged for a memoised digest to still describe the file's bytes.

    ``ctime`` cannot be set from user space: any rewrite (even one that restores size and
    mtime, as ``cp -p``, ``rsync -t`` or ``os.utime`` do) moves it forward.
    """
    st = path.stat()
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


class FileChangedWhileHashing(RuntimeError):
    """The file's identity (inode, size, times) changed between the start and the end of hashing it."""


class DigestIndex:
    """Private on-disk memo of file sha256 keyed by inode: (st_dev, st_ino), valid for size, mtime, ctime.

    One small JSON file per inode under ``index_dir`` (hard links share it); an entry whose
    recorded (dev, ino, size, mtime_ns, ctime_ns) differ from the file's current ``stat`` is
    ignored and recomputed. Entries are written to a 0600 temp file and renamed, so a
    reader never sees half an entry. A per-entry :class:`filelock.FileLock` makes
    concurrent callers (threads or processes) compute a digest once.

    The index must be private: folders created here are 0700. If ``index_dir`` (or the
    cache folder above it) is not owned by the effective user, is writable by group or
    others, or is a symbolic link, anyone else who can write it could plant digests, so
    the memo is not used at all (every file is hashed in full, each time) and one warning
    says so.
    """

    def __init__(self, index_dir: str | os.PathLike[str] | None = None) -> None:
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self._usable: bool | None = None

    def _memo_usable(self) -> bool:
        """Create the index folder if missing and check that only we can write it (once per index)."""
        if self._usable is not None:
            return self._usable
        # The folder itself, and the cache folder above it: whoever can write that one can rename
        # the index away and put their own in its place. Nothing is created under an unsafe one.
        parent = self.index_dir.parent
        reason: tuple[Path, str] | None = None
        if os.path.lexists(parent) and (why := unsafe_folder_reason(parent)) is not None:
            reason = (parent, why)
        if reason is None:
            try:
                make_private_dir(self.index_dir)
            except OSError as exc:
                reason = (self.index_dir, f"cannot be created ({exc.strerror})")
        if reason is None:
            for d in (self.index_dir, parent):
                if (why := unsafe_folder_reason(d)) is not None:
                    reason = (d, why)
                    break
        self._usable = reason is None
        if reason is not None and str(reason[0]) not in _warned_dirs:
            _warned_dirs.add(str(reason[0]))
            _logger.warning(
                "slide digest memo not used: %s %s (others could plant digests there); every slide is "
                "hashed in full each time. Set STAMP_CACHE_DIR to a folder only you can write "
                "(owned by you, not writable by group or others, not a symlink).",
                reason[0],
                reason[1],
            )
        return self._usable

    def _entry_paths(self, ident: Mapping[str, int]) -> tuple[Path, Path]:
        name = hashlib.sha256(f"{ident['dev']}:{ident['ino']}".encode()).hexdigest()[:32]
        sub = self.index_dir / name[:2]
        return sub / f"{name}.json", sub / f"{name}.lock"

    @staticmethod
    def _read(entry: Path, ident: Mapping[str, int]) -> str | None:
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                return None  # not an entry this user wrote
            raw = os.read(fd, _MAX_ENTRY_BYTES + 1)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            return None
        if any(type(data.get(k)) is not int or data[k] != ident[k] for k in _IDENT_FIELDS):
            return None
        digest = data.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            return None
        return digest

    @staticmethod
    def _write(entry: Path, payload: Mapping[str, Any]) -> None:
        """Write the entry via a 0600 temp file in its folder and rename it into place."""
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(dict(payload), sort_keys=True).encode("utf-8"))
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _hash_unchanged(p: Path, ident: Mapping[str, int]) -> str:
        digest = file_sha256(p)
        if _identity(p) != ident:
            raise FileChangedWhileHashing(
                f"{p}: file changed while it was being hashed; retry when it is complete"
            )
        return digest

    def lookup(self, path: str | os.PathLike[str], attempts: int = 3) -> Digest:
        """Return the file's sha256, hashing it only if no valid index entry exists.

        A file replaced whole while it was read (another run renaming a finished output into place)
        is hashed again, up to ``attempts`` times; one that keeps changing (still being copied in)
        raises ``RuntimeError``.
        """
        for attempt in range(1, attempts + 1):
            try:
                return self._lookup(Path(path))
            except FileChangedWhileHashing:
                if attempt == attempts:
                    raise
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _lookup(self, p: Path) -> Digest:
        # identity comes from stat (dev, inode): no need to resolve
        ident = _identity(p)
        if not self._memo_usable():
            return Digest(self._hash_unchanged(p, ident), computed=True)
        entry, lock_path = self._entry_paths(ident)
        cached = self._read(entry, ident)
        if cached is not None:
            return Digest(cached, computed=False)
        make_private_dir(entry.parent)
        with FileLock(str(lock_path), mode=0o600):
            cached = self._read(entry, ident)  # another process may have finished meanwhile
            if cached is not None:
                return Digest(cached, computed=False)
            digest = self._hash_unchanged(p, ident)
            self._write(entry, {**ident, "sha256": digest, "format": INDEX_FORMAT})
        return Digest(digest, computed=True)

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Shorthand for ``lookup(path).sha256``."""
        return self.lookup(path).sha256

    def remember(self, path: str | os.PathLike[str], sha256: str) -> None:
        """Record the digest of a file this process has just written (its bytes were hashed before the rename).

        Saves re-reading outputs on the next check; the entry is keyed on the file's identity now, so
        any later rewrite (new ctime) makes it void.
        """
        if not self._memo_usable():
            return
        p = Path(path)
        ident = _identity(p)
        entry, _lock = self._entry_paths(ident)
        make_private_dir(entry.parent)
        self._write(entry, {**ident, "sha256": sha256, "format": INDEX_FORMAT})


_SHARED: dict[str, DigestIndex] = {}


def shared_index() -> DigestIndex:
    """The process's :class:`DigestIndex` for :func:`default_index_dir` (its folder checks run once)."""
    key = str(default_index_dir())
    index = _SHARED.get(key)
    if index is None:
        index = _SHARED.setdefault(key, DigestIndex(key))
    return index


def canonical(value: Any) -> Any:
    """Turn parameters into JSON-stable values (paths → str, sets → sorted lists)."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "model_dump"):  # pydantic models
        return canonical(value.model_dump(mode="json"))
    return value


def stage_cache_key(
    *,
    task_name: str,
    content_sha256: str | Iterable[str],
    params: Mapping[str, Any],
    code_version: str,
    weights_sha256: str | None = None,
) -> str:
    """Cache key of one per-slide (or per-fold) stage run, as a hex sha256.

    The key holds what decides the output and nothing else: the input's content digest
    (not its path), the stage parameters, the task name (so two stages never share a
    key), the stage code version and the encoder weights digest.
    """
    digests = content_sha256 if isinstance(content_sha256, str) else sorted(content_sha256)
    blob = json.dumps(
        {
            "task": task_name,
            "content": digests,
            "params": canonical(params),
            "code": code_version,
            "weights": weights_sha256,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def code_hash(files: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 over the sorted files' own sha256 digests (a stage's code version)."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def package_code_hash(package_dir: str | os.PathLike[str], pattern: str = "*.py") -> str:
    """Code hash of every ``pattern`` file directly in ``package_dir`` (like STAMP's)."""
    return code_hash(Path(package_dir).glob(pattern))
