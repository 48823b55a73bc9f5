"""Content digests and cache keys (DESIGN contract 4), free of any Prefect import.

* :func:`file_sha256` streams a file through sha256.
* :class:`DigestIndex` memoises a file's sha256 per (absolute path, size, mtime) in a
  small on-disk index, guarded by a per-file lock so that concurrent processes hash a
  slide once and the others read the result.
* :func:`stage_cache_key` combines content digest, stage parameters, task name, code
  version and weights digest into one key, so a moved slide hits and a changed
  parameter misses.
* :func:`code_hash` fingerprints source files (the stage's "code version").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stamp.fileio import atomic_write_text

_CHUNK = 8 * 1024 * 1024
INDEX_FORMAT = 1


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


class DigestIndex:
    """On-disk memo of file sha256 keyed by (absolute path, size, mtime_ns).

    One small JSON file per key under ``index_dir``; writes go to a temp file and are
    renamed, so a reader never sees half an entry. A per-key :class:`filelock.FileLock`
    makes concurrent callers (threads or processes) compute a digest once.
    """

    def __init__(self, index_dir: str | os.PathLike[str] | None = None) -> None:
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()

    def _entry_paths(self, path: Path) -> tuple[Path, Path, dict[str, Any]]:
        st = path.stat()
        ident = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
        sub = self.index_dir / name[:2]
        return sub / f"{name}.json", sub / f"{name}.lock", ident

    def _read(self, entry: Path, ident: Mapping[str, Any]) -> str | None:
        try:
            data = json.loads(entry.read_text())
        except (OSError, ValueError):
            return None
        if data.get("format") != INDEX_FORMAT or any(data.get(k) != v for k, v in ident.items()):
            return None
        digest = data.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def lookup(self, path: str | os.PathLike[str]) -> Digest:
        """Return the file's sha256, hashing it only if no valid index entry exists."""
        p = Path(path).resolve()
        entry, lock_path, ident = self._entry_paths(p)
        cached = self._read(entry, ident)
        if cached is not None:
            return Digest(cached, computed=False)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            cached = self._read(entry, ident)  # another process may have finished meanwhile
            if cached is not None:
                return Digest(cached, computed=False)
            digest = file_sha256(p)
            if self._entry_paths(p)[2] != ident:  # file changed while we hashed it
                raise RuntimeError(f"{p}: file changed while it was being hashed; retry when it is complete")
            atomic_write_text(entry, json.dumps({**ident, "sha256": digest, "format": INDEX_FORMAT}))
        return Digest(digest, computed=True)

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Shorthand for ``lookup(path).sha256``."""
        return self.lookup(path).sha256


def _canonical(value: Any) -> Any:
    """Turn parameters into JSON-stable values (paths → str, sets → sorted lists)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "model_dump"):  # pydantic models
        return _canonical(value.model_dump(mode="json"))
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
            "params": _canonical(params),
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
