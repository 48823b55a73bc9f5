"""Weights lock, local resolution and sha256 verification (DESIGN contract 5).

* The lock maps encoder name -> source (HF repo + pinned revision, or URL) and each
  file's sha256 (``null`` = unverified). The built-in lock is derived from the
  registry; ``containers/weights.lock.json`` is that lock written out
  (``python -m stamp.encoders lock``), and ``STAMP_WEIGHTS_LOCK=<path>`` or the
  ``lock=`` argument replaces it (a container bakes its own, pinned with
  ``python -m stamp.encoders pin``).
* :func:`resolve_weights` only looks at local files: ``<weights_dir>/<name>/<file>``,
  then the Hugging Face cache at the pinned revision
  (``huggingface_hub.try_to_load_from_cache``, which never opens a connection), then
  STAMP's own cache (``~/.cache/stamp``). Fetching is a separate, explicit step
  (:func:`fetch_command` / ``python -m stamp.encoders fetch``), so loading never
  reaches the network, with or without ``HF_HUB_OFFLINE=1``.
* :func:`verify_sha256` refuses a file whose digest differs from the lock, naming
  the file, the expected and the actual digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stamp.encoders.errors import (
    WeightsDigestError,
    WeightsNotFoundError,
    WeightsOutsideRootError,
    WeightsUnverifiedError,
)
from stamp.encoders.registry import ENCODERS, EncoderSpec, WeightsSource, get_spec
from stamp.fileio import atomic_write_text

log = logging.getLogger(__name__)

LOCK_FORMAT = 1
LOCK_ENV = "STAMP_WEIGHTS_LOCK"
WEIGHTS_DIR_ENV = "STAMP_WEIGHTS_DIR"
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class LockEntry:
    """One encoder's pinned source and file digests."""

    name: str
    files: Mapping[str, str | None]
    hf_repo: str | None = None
    revision: str | None = None
    url: str | None = None
    digest_source: str | None = None

    @classmethod
    def from_source(cls, name: str, src: WeightsSource) -> LockEntry:
        return cls(name, dict(src.files), src.hf_repo, src.revision, src.url, src.digest_source)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.hf_repo:
            d["repo"] = self.hf_repo
            d["revision"] = self.revision
        else:
            d["url"] = self.url
        d["files"] = dict(self.files)
        if self.digest_source:
            d["digest_source"] = self.digest_source
        return d

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> LockEntry:
        files = d.get("files")
        if not isinstance(files, Mapping) or not files:
            raise ValueError(f"weights lock entry {name!r}: 'files' must be a non-empty mapping")
        for fn, sha in files.items():
            parts = Path(fn).parts
            if not parts or Path(fn).is_absolute() or ".." in parts or "\\" in fn:
                raise ValueError(
                    f"weights lock entry {name!r}: file name {fn!r} must be a relative path without '..'"
                )
            if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
                raise ValueError(
                    f"weights lock entry {name!r}: sha256 of {fn!r} must be 64 hex chars or null"
                )
        _check_source(name, d)
        return cls(
            name,
            {k: (v.lower() if v else None) for k, v in files.items()},
            d.get("repo"),
            d.get("revision"),
            d.get("url"),
            d.get("digest_source"),
        )


Lock = Mapping[str, LockEntry]

_SOURCE_PATTERNS = {
    "repo": re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"),
    "revision": re.compile(r"[A-Za-z0-9][\w./-]*"),
    "gdrive": re.compile(r"[A-Za-z0-9_][\w-]*"),
    "url": re.compile(r"(?:https?|file)://[^\s]+"),  # file://: a local mirror of an offline site
}


def _check_source(name: str, d: Mapping[str, Any]) -> None:
    """Refuse lock source values that are not a plain repo id, revision, Drive id or http(s)/file URL.

    They become arguments of a download tool: nothing starting with ``-`` or holding spaces
    or shell syntax gets through.
    """
    url = d.get("url")
    values = {"repo": d.get("repo"), "revision": d.get("revision"), "url": url}
    if isinstance(url, str) and url.startswith("gdrive:"):
        values = {**values, "url": None, "gdrive": url[len("gdrive:") :]}
    for key, value in values.items():
        if value is None:
            continue
        if not isinstance(value, str) or not _SOURCE_PATTERNS[key].fullmatch(value):
            raise ValueError(
                f"weights lock entry {name!r}: {key} {value!r} is not a valid {key} "
                f"(letters, digits, '._-/' only); fix the lock ({LOCK_ENV})"
            )


def default_lock() -> dict[str, LockEntry]:
    """The lock derived from the registry's declared sources and digests."""
    return {n: LockEntry.from_source(n, s.weights) for n, s in ENCODERS.items() if s.weights is not None}


def lock_to_json(lock: Lock) -> dict[str, Any]:
    return {"format": LOCK_FORMAT, "encoders": {n: e.to_json() for n, e in sorted(lock.items())}}


def write_lock(path: str | os.PathLike[str], lock: Lock | None = None) -> Path:
    """Write ``lock`` (default: the registry's) as JSON, atomically."""
    text = json.dumps(lock_to_json(lock if lock is not None else default_lock()), indent=2) + "\n"
    return atomic_write_text(path, text)


def load_lock(lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None) -> dict[str, LockEntry]:
    """Resolve the lock to use: ``lock`` (entries, JSON dict or path) > ``$STAMP_WEIGHTS_LOCK`` > built-in.

    A JSON lock need not list every encoder: the built-in entries fill the gaps.
    """
    base = default_lock()
    if lock is None:
        env = os.environ.get(LOCK_ENV)
        if not env:
            return base
        lock = env
    mapping: Mapping[str, Any]
    if isinstance(lock, (str, os.PathLike)):
        path = Path(lock)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"weights lock {path} does not exist (check {LOCK_ENV})") from None
        except ValueError as e:
            raise ValueError(f"weights lock {path} is not valid JSON: {e}") from None
        mapping = data
    else:
        mapping = lock
    if all(isinstance(v, LockEntry) for v in mapping.values()):
        base.update(mapping)
        return base
    data = dict(mapping)
    if data.get("format", LOCK_FORMAT) != LOCK_FORMAT:
        raise ValueError(
            f"weights lock format {data.get('format')!r} is not supported (expected {LOCK_FORMAT})"
        )
    entries = data.get("encoders", {})
    for name, d in entries.items():
        base[name] = LockEntry.from_json(name, d)
    return base


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_sha256(path: str | os.PathLike[str], expected: str | None, *, name: str | None = None) -> str:
    """Return the file's sha256; raise :class:`WeightsDigestError` if it is not ``expected``.

    ``expected=None`` (no digest in the lock) only computes and returns the digest.
    """
    actual = file_sha256(path)
    if expected is not None and actual != expected.lower():
        raise WeightsDigestError(path, expected.lower(), actual, name)
    return actual


def stamp_cache_dir() -> Path:
    """STAMP's own weights cache (``$XDG_CACHE_HOME/stamp`` or ``~/.cache/stamp``)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stamp"


def _dest(spec: EncoderSpec, weights_dir: str | os.PathLike[str] | None) -> Path:
    return (
        Path(weights_dir if weights_dir is not None else os.environ.get(WEIGHTS_DIR_ENV, "WEIGHTS_DIR"))
        / spec.name
    )


def fetch_argv(
    spec: EncoderSpec, weights_dir: str | os.PathLike[str] | None = None, *, entry: LockEntry | None = None
) -> list[str] | None:
    """The argv (run without a shell) that downloads ``spec``'s weights into ``<weights_dir>/<name>/``.

    None if the encoder needs no weights. URL sources download the first file only
    (the caller creates the folder).
    """
    if spec.weights is None:
        return None
    e = entry or LockEntry.from_source(spec.name, spec.weights)
    dest = _dest(spec, weights_dir)
    if e.hf_repo:
        rev = ["--revision", e.revision] if e.revision else []
        return ["hf", "download", e.hf_repo, *e.files, *rev, "--local-dir", str(dest)]
    url = str(e.url)
    out = str(dest / next(iter(e.files)))
    if url.startswith("gdrive:"):
        return [sys.executable, "-m", "gdown", url[len("gdrive:") :], "-O", out]
    return ["curl", "-L", "--fail", "-o", out, url]


def fetch_command(
    spec: EncoderSpec, weights_dir: str | os.PathLike[str] | None = None, *, entry: LockEntry | None = None
) -> str:
    """The command (every value shell-quoted) that downloads ``spec``'s weights into ``<weights_dir>/<name>/``.

    Gated repositories get the licence/login prerequisite spelled out.
    """
    argv = fetch_argv(spec, weights_dir, entry=entry)
    if argv is None:
        return "(no weights needed)"
    e = entry or LockEntry.from_source(spec.name, spec.weights)  # type: ignore[arg-type]
    cmd = shlex.join(argv)
    if e.hf_repo:
        if spec.gated:
            cmd = (
                f"after accepting the licence at https://huggingface.co/{e.hf_repo} and `hf auth login` "
                f"(huggingface_hub<1.0: huggingface-cli login / download), run: {cmd}"
            )
        return cmd
    cmd = f"mkdir -p {shlex.quote(str(_dest(spec, weights_dir)))} && {cmd}"
    return cmd + "  (pip install gdown)" if "gdown" in argv else cmd


def _hf_cached(
    repo: str, filename: str, revision: str | None, cache_dir: str | os.PathLike[str] | None
) -> tuple[Path, Path] | None:
    """``(file, cache root)`` from the local HF cache at ``revision``, or None. Never opens a connection."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a core dependency
        return None
    root = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    found = try_to_load_from_cache(repo, filename, cache_dir=os.fspath(root), revision=revision)
    if isinstance(found, str) and Path(found).is_file():
        return Path(found), root
    return None


def confined(path: Path, root: Path, name: str) -> Path:
    """``path`` if it resolves (symlinks and ``..`` followed) inside ``root``; else raise.

    Symlinks within the root are fine (the HF cache links snapshots to blobs); a link
    that leaves it raises :class:`WeightsOutsideRootError`.
    """
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise WeightsOutsideRootError(path, real, real_root, name)
    return path


def resolve_weights(
    spec: EncoderSpec | str,
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    hf_cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Local paths of every file in the encoder's lock entry: ``{filename: path}``.

    Looks in ``<weights_dir>/<name>/<file>`` (``weights_dir`` defaults to
    ``$STAMP_WEIGHTS_DIR``), then the HF cache at the pinned revision, then STAMP's
    cache. Raises :class:`WeightsNotFoundError` (with the fetch command) for the
    first missing file, :class:`WeightsOutsideRootError` for a file that resolves
    outside the folder it was found in. Does not verify digests: see :func:`verify_files`.
    """
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.weights is None:
        return {}
    locks = load_lock(lock)
    entry = locks.get(spec.name) or LockEntry.from_source(spec.name, spec.weights)
    if weights_dir is None and os.environ.get(WEIGHTS_DIR_ENV):
        weights_dir = os.environ[WEIGHTS_DIR_ENV]
    out: dict[str, Path] = {}
    for i, filename in enumerate(entry.files):
        searched: list[str] = []
        path: Path | None = None
        if weights_dir is not None:
            cand = Path(weights_dir) / spec.name / filename
            searched.append(str(cand))
            if cand.is_file():
                path = confined(cand, Path(weights_dir), spec.name)
        if path is None and entry.hf_repo:
            searched.append(f"HF cache {entry.hf_repo}@{entry.revision or 'main'}")
            hit = _hf_cached(entry.hf_repo, filename, entry.revision, hf_cache_dir)
            if hit is not None:
                path = confined(*hit, spec.name)
        if path is None and i == 0 and spec.weights.legacy_cache:
            cand = stamp_cache_dir() / spec.weights.legacy_cache
            searched.append(str(cand))
            if cand.is_file():
                path = confined(cand, stamp_cache_dir(), spec.name)
        if path is None:
            raise WeightsNotFoundError(
                spec.name, filename, searched, fetch_command(spec, weights_dir, entry=entry)
            )
        out[filename] = path
    return out


def verify_files(
    spec: EncoderSpec,
    files: Mapping[str, Path],
    *,
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    strict: bool = False,
) -> dict[str, str]:
    """Check every resolved file against the lock; return ``{filename: actual sha256}``.

    A file without a locked digest is accepted with a warning (refused if ``strict``).
    """
    locks = load_lock(lock)
    entry = locks.get(spec.name) or (LockEntry.from_source(spec.name, spec.weights) if spec.weights else None)
    digests: dict[str, str] = {}
    for filename, path in files.items():
        expected = entry.files.get(filename) if entry else None
        actual = verify_sha256(path, expected, name=spec.name)
        if expected is None:
            if strict:
                raise WeightsUnverifiedError(path, actual, spec.name)
            log.warning(
                "encoder %s: %s has no locked sha256 (unverified); its digest is %s", spec.name, path, actual
            )
        digests[filename] = actual
    return digests


@contextlib.contextmanager
def verified_private_copy(
    spec: EncoderSpec,
    files: Mapping[str, Path],
    *,
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> Iterator[tuple[dict[str, Path], dict[str, str]]]:
    """Copy ``files`` into a private temp folder, hashing the bytes as they are copied.

    For encoders that run code shipped with their weights (``trust_remote_code``):
    every file must have a pinned sha256 (a null entry raises
    :class:`WeightsUnverifiedError` naming it, before anything is copied) and the
    copied bytes must match it (:class:`WeightsDigestError`). Yields
    ``({filename: copied path}, {filename: sha256})``; the caller loads from the copy,
    so a file swapped after verification, or anything else lying in the weights
    folder, is never read. The folder (mode 0700) is removed on exit.
    """
    locks = load_lock(lock)
    entry = locks.get(spec.name) or (LockEntry.from_source(spec.name, spec.weights) if spec.weights else None)
    expected = {fn: entry.files.get(fn) if entry else None for fn in files}
    why = "because it runs code shipped with its weights (trust_remote_code)"
    for fn, path in files.items():
        if expected[fn] is None:
            raise WeightsUnverifiedError(path, file_sha256(path), spec.name, why=why)
    tag = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:16]
    tmp = Path(tempfile.mkdtemp(prefix="stamp-verified-"))
    try:
        # one folder named after the pinned digests: a stable, content-specific module name for remote code
        dest = tmp / f"{spec.name.replace('-', '_')}_{tag}"
        out: dict[str, Path] = {}
        digests: dict[str, str] = {}
        for fn, path in files.items():
            target = dest / fn
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            h = hashlib.sha256()
            src_fd = os.open(path.resolve(), os.O_RDONLY | os.O_NOFOLLOW)
            with open(src_fd, "rb") as src, open(target, "xb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            actual, want = h.hexdigest(), str(expected[fn]).lower()
            if actual != want:
                raise WeightsDigestError(path, want, actual, spec.name)
            out[fn], digests[fn] = target, actual
        yield out, digests
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def combined_digest(parts: Mapping[str, Mapping[str, str]]) -> str:
    """One sha256 over ``{encoder: {filename: sha256}}`` (sorted): the weights digest used in cache keys."""
    h = hashlib.sha256()
    for enc in sorted(parts):
        for fn in sorted(parts[enc]):
            h.update(f"{enc}/{fn}:{parts[enc][fn]}\n".encode())
    return h.hexdigest()


def pin(
    names: list[str],
    weights_dir: str | os.PathLike[str],
    *,
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
) -> dict[str, LockEntry]:
    """Digest the local files of ``names`` and return lock entries carrying those digests.

    Meant for image builds: after fetching, ``pin`` records what was baked in. A
    file whose locked digest differs is still refused (pinning never overrides a
    known digest).
    """
    locks = load_lock(lock)
    out: dict[str, LockEntry] = {}
    for name in names:
        spec = get_spec(name)
        if spec.weights is None:
            continue
        files = resolve_weights(spec, weights_dir, lock=locks)
        digests = verify_files(spec, files, lock=locks)
        base = locks.get(name) or LockEntry.from_source(name, spec.weights)
        out[name] = LockEntry(
            name,
            digests,
            base.hf_repo,
            base.revision,
            base.url,
            base.digest_source or "pinned from local files",
        )
    return out
