"""Private, JSON-only result storage for our Prefect tasks (security review finding M6).

Prefect persists task results (our cache records) as files named by the cache key, and its
default serializer is pickle. When Prefect reads a record it unpickles with whatever
serializer the *record's own metadata* names, even for a task declared with
``result_serializer="json"`` — and ``ResultStore._exists`` already deserializes the record
before any cache hit is decided. Cache keys are computed from public inputs, so anyone who
can write the result folder could plant a pickle under a future key and run code in the
next pipeline run.

:class:`PrivateJsonResults` closes that:

* the folder is ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` read at call time (so tests and
  ``stamp`` commands that change the setting after import are honoured), created with mode
  0700, and refused when it is a symlink, owned by another user or writable by group/others;
* a record is handed to Prefect only when it is a JSON record whose serializer is exactly
  Prefect's default JSON serializer (no pickle, no custom ``jsonlib``/``object_decoder``,
  which would be another way to run code) and whose result holds no encoded objects beyond a
  few harmless types. Anything else raises ``ValueError``: Prefect treats the key as absent,
  runs the task again and overwrites the record;
* records are written atomically (temp file in the same folder, 0600, fsync, rename).

Tasks use it by spreading :data:`RESULT_OPTIONS` into the decorator::

    @task(name="...", cache_policy=..., **RESULT_OPTIONS)

Prefect refuses an unsaved block instance as ``result_storage`` (``Task.__init__`` demands a
server-side block document, but only for a *truthy* block). This block is a local file
system like the one Prefect builds itself for a ``pathlib.Path`` result storage, so it
answers ``False`` to ``bool()`` to pass that check and then follows exactly Prefect's path
for unsaved local storage (absolute storage keys, no block document id). Never test this
object for truthiness; compare with ``is None``.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

from stamp.fileio import make_private_dir, unsafe_folder_reason

__all__ = [
    "RESULT_OPTIONS",
    "RESULT_STORAGE",
    "PrivateJsonResults",
    "UnsafeResultStorageError",
    "check_record",
]

_DIR_MODE = 0o700
_FILE_MODE = 0o600
#: The serializer block Prefect writes for ``result_serializer="json"``; a record must name exactly this.
_JSON_SERIALIZER: dict[str, Any] = json.loads(JSONSerializer().model_dump_json())
_RECORD_KEYS = frozenset({"metadata", "result"})
_METADATA_KEYS = frozenset({"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"})
#: ``{"__class__": ...}`` objects that Prefect's JSON decoder may rebuild (it imports the named
#: class and validates into it); these are what our results can legitimately contain.
_ALLOWED_CLASSES = frozenset(
    {
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib._local.Path",
        "pathlib._local.PosixPath",
        "pathlib._local.PurePosixPath",
        "uuid.UUID",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "decimal.Decimal",
    }
)


class UnsafeResultStorageError(PermissionError):
    """The result folder could be written by someone else; we neither read nor write it."""


def _check_result_value(value: Any) -> None:
    """Reject encoded objects that Prefect's JSON decoder would import or construct."""
    if isinstance(value, dict):
        if "__exc_type__" in value:
            raise ValueError("result record holds an encoded exception")
        cls = value.get("__class__")
        if cls is not None and cls not in _ALLOWED_CLASSES:
            raise ValueError(f"result record holds an object of class {cls!r}, which is not allowed")
        for item in value.values():
            _check_result_value(item)
    elif isinstance(value, list):
        for item in value:
            _check_result_value(item)


def check_record(content: bytes) -> bytes:
    """Return a safe, canonical copy of a Prefect result record, or raise ``ValueError``.

    Safe means: a JSON object ``{"metadata": {...}, "result": "<json text>"}`` whose
    ``metadata.serializer`` is Prefect's default JSON serializer. The record is re-encoded,
    so Prefect parses exactly the document that was checked.
    """
    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"result record is not JSON: {exc}") from None
    if not isinstance(record, dict) or set(record) != _RECORD_KEYS:
        raise ValueError("result record is not a Prefect result record")
    metadata, result = record["metadata"], record["result"]
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_KEYS:
        raise ValueError("result record has unexpected metadata")
    serializer = metadata.get("serializer")
    if serializer != _JSON_SERIALIZER:
        kind = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise ValueError(f"result record uses serializer {kind!r}, not Prefect's plain JSON serializer")
    if not isinstance(result, str):
        raise ValueError("result record's result is not JSON text")
    try:
        value = json.loads(result)
    except ValueError as exc:
        raise ValueError(f"result record's result is not JSON: {exc}") from None
    _check_result_value(value)
    return json.dumps(record).encode()


class PrivateJsonResults(LocalFileSystem):
    """Prefect result storage that keeps records private and only hands out JSON records.

    With ``basepath=None`` the folder is ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` as set when
    a record is read or written (not when the block is made).
    """

    _block_type_name = "STAMP private JSON results"

    def __bool__(self) -> bool:
        # Prefect's Task/Flow constructors refuse truthy unsaved blocks; see the module docstring.
        return False

    # -- folder -----------------------------------------------------------------------------

    def _base(self) -> Path:
        """The configured folder: absolute, user expanded, symlinks not resolved."""
        raw = self.basepath or PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()
        return Path(os.path.abspath(Path(raw).expanduser()))

    def _resolve_path(self, path: str | None) -> Path:
        base = self._base().resolve()
        if path is None:
            return base
        resolved = Path(path).expanduser()
        if not resolved.is_absolute():
            resolved = base / resolved
        resolved = resolved.resolve()
        if resolved != base and base not in resolved.parents:
            raise ValueError(f"Provided path {resolved} is outside of the base path {base}.")
        return resolved

    def private_folder(self, *, create: bool) -> Path:
        """The checked result folder (created with 0700 when ``create``).

        Raises :class:`UnsafeResultStorageError` when it is a symlink, is not a folder, is
        owned by another user, or is writable by group/others.
        """
        base = self._base()
        if create and not os.path.lexists(base):
            make_private_dir(base)
        os.lstat(base)  # FileNotFoundError when missing and not created
        problem = unsafe_folder_reason(base)
        if problem is None:
            return base
        fix = f"use a folder of your own with mode 0700 (chmod 700 {base}) or set PREFECT_RESULTS_LOCAL_STORAGE_PATH"
        raise UnsafeResultStorageError(f"Refusing Prefect result folder {base}: it {problem}; {fix}.")

    # -- reading ----------------------------------------------------------------------------

    def _read_checked(self, path: str) -> bytes:
        try:
            self.private_folder(create=False)
        except FileNotFoundError:
            raise ValueError(f"Path {self._base()} does not exist.") from None
        target = self._resolve_path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ValueError(f"Path {target} does not exist.") from None
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ValueError(f"Path {target} is not a file.")
            content = fh.read()
        return check_record(content)

    async def aread_path(self, path: str) -> bytes:
        """Async twin of :meth:`read_path` (Prefect prefers it when present)."""
        return self._read_checked(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]  # as Prefect's own LocalFileSystem
        """The record at ``path`` if it is a safe JSON record; otherwise ``ValueError``.

        ``ValueError`` (or :class:`UnsafeResultStorageError` for an unsafe folder) makes
        Prefect treat the key as absent, so the task runs again.
        """
        return self._read_checked(path)

    # -- writing ----------------------------------------------------------------------------

    def _write_checked(self, path: str, content: bytes) -> str:
        check_record(content)  # a pickle record here means a task lacks result_serializer="json"
        base = self.private_folder(create=True)
        target = self._resolve_path(path)
        if target.parent != base.resolve():
            make_private_dir(target.parent)  # a storage key with "/" in it
        if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
            raise ValueError(f"Path {target} already exists and is not a file.")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:100]}.", suffix=".tmp", dir=target.parent)
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return str(target)

    async def awrite_path(self, path: str, content: bytes) -> str:
        """Async twin of :meth:`write_path`."""
        return self._write_checked(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]  # as Prefect's own LocalFileSystem
        """Write a JSON result record atomically with mode 0600 in the private folder."""
        return self._write_checked(path, content)


#: The storage all our tasks share (its folder follows ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``).
RESULT_STORAGE = PrivateJsonResults()

#: Spread into ``@task(...)``: persisted, JSON-serialized results in :data:`RESULT_STORAGE`.
RESULT_OPTIONS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "result_storage": RESULT_STORAGE,
}
