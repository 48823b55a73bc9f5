"""Provenance of every output (DESIGN contract 4) — the one place that decides reuse and replacement.

An output *unit* is what one computation publishes: a slide's h5 + thumbnail + tissue GeoJSON, a
crossval fold folder, a slide's heatmaps folder, a model's checkpoint + training metrics, a
deployment's prediction files, a statistics run's tables and plots. Its *record* says what it was
computed from — a :class:`Provenance`: stage, inputs by content digest, the settings that change the
output, code version, weights digest — plus the sha256 of every file it published and, where it has
one, its :class:`Subject` (the slide it is about).

* :func:`check_files` / :func:`check_folder` answer with a :class:`Check`: ``REUSE`` only when the
  recorded key equals the key this run would write and every file still has its recorded digest;
  ``ABSENT`` when nothing is there; ``STALE`` when it is ours but differs (recompute, then replace);
  ``FOREIGN`` when something is there that no record of ours covers, or our record is about another
  subject — never replaced or deleted: that item fails with a one-line :class:`ForeignOutput`.
* :func:`publish_files` / :func:`publish_folder` are how outputs are put in place: check ownership,
  write the record first (with the new files' digests), then rename the files in (a folder: one
  exchange). A crash in between leaves a record whose digests do not match: ``STALE`` next time,
  never ``FOREIGN``, never reused.

Records live in ``<folder>/.<unit>.provenance.json`` (files) or ``<folder>/.provenance.json``
(folders); an h5 also carries its provenance in its ``stamp_provenance`` attribute. File digests go
through :class:`stamp.hashing.DigestIndex` (memoised per inode, size, mtime and ctime in a private
index), so checking a cached rerun costs a ``stat`` and a small read per file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamp.fileio import atomic_write_text, fsync_path, publish_dir
from stamp.hashing import DigestIndex, canonical, file_sha256, shared_index

__all__ = [
    "FOLDER_RECORD",
    "Check",
    "ForeignOutput",
    "Provenance",
    "Record",
    "Subject",
    "Verdict",
    "check_files",
    "check_folder",
    "publish_files",
    "publish_folder",
    "read_record",
    "record_files",
    "record_path",
]

PROVENANCE_FORMAT = 1
FOLDER_RECORD = ".provenance.json"
_MAX_RECORD_BYTES = 32 * 1024 * 1024


class ForeignOutput(Exception):
    """An output path holds something we did not write (or wrote for another subject); it is left alone."""


class Verdict(enum.Enum):
    """What to do with an output unit."""

    ABSENT = "absent"
    REUSE = "reuse"
    STALE = "stale"
    FOREIGN = "foreign"


@dataclass(frozen=True)
class Check:
    """A :class:`Verdict` and one line saying why."""

    verdict: Verdict
    reason: str = ""

    @property
    def reusable(self) -> bool:
        """True for ``REUSE``."""
        return self.verdict is Verdict.REUSE

    def raise_if_foreign(self) -> None:
        """Raise :class:`ForeignOutput` (its reason) for ``FOREIGN``."""
        if self.verdict is Verdict.FOREIGN:
            raise ForeignOutput(self.reason)


@dataclass(frozen=True)
class Subject:
    """What a unit is about (a slide): the same subject has the same path or the same content."""

    path: str
    sha256: str | None = None

    def same(self, other: Subject) -> bool:
        """Same path, or same content digest."""
        return self.path == other.path or (self.sha256 is not None and self.sha256 == other.sha256)


def canonical_json(value: Any) -> str:
    """Stable JSON of ``value`` (sorted keys, paths as strings) — what keys are computed over."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Provenance:
    """What an output is computed from; two equal provenances give the same output."""

    stage: str
    inputs: Mapping[str, str]
    settings: Mapping[str, Any]
    code: str
    weights: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (inputs and settings canonicalised)."""
        return {
            "stage": self.stage,
            "inputs": dict(canonical(dict(self.inputs))),
            "settings": canonical(dict(self.settings)),
            "code": self.code,
            "weights": self.weights,
        }

    @property
    def key(self) -> str:
        """sha256 over :meth:`as_dict` as canonical JSON."""
        return hashlib.sha256(canonical_json(self.as_dict()).encode()).hexdigest()

    def changes_from(self, recorded: Mapping[str, Any]) -> str:
        """One line naming what differs between a recorded provenance and this one."""
        now = self.as_dict()
        parts = []
        for name in ("stage", "code", "weights"):
            if recorded.get(name) != now[name]:
                parts.append(f"{name} changed")
        for name in ("inputs", "settings"):
            diffs = _diff_paths(recorded.get(name) or {}, now[name], name)
            if diffs:
                shown = ", ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                parts.append(f"changed {shown}")
        return "; ".join(parts) or "recorded with another provenance format"


def _diff_paths(old: Any, new: Any, prefix: str, depth: int = 0) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and depth < 3:
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            if old.get(k) != new.get(k):
                out += _diff_paths(old.get(k), new.get(k), f"{prefix}.{k}", depth + 1)
        return out
    return [] if old == new else [prefix]


@dataclass
class Record:
    """A unit's record as stored: provenance fields, its key, subject and output digests."""

    provenance: dict[str, Any]
    key: str
    outputs: dict[str, str] = field(default_factory=dict)
    subject: Subject | None = None

    def to_json(self) -> str:
        """The record file's text."""
        subject = None if self.subject is None else {"path": self.subject.path, "sha256": self.subject.sha256}
        data = {
            "stamp_provenance": PROVENANCE_FORMAT,
            "key": self.key,
            **self.provenance,
            "subject": subject,
            "outputs": dict(sorted(self.outputs.items())),
        }
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Record | None:
        """Parse a record; None when it is not one of ours."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("stamp_provenance") != PROVENANCE_FORMAT:
            return None
        key, outputs, subject = data.get("key"), data.get("outputs") or {}, data.get("subject")
        if not isinstance(key, str) or not isinstance(outputs, dict):
            return None
        subj = None
        if isinstance(subject, dict) and isinstance(subject.get("path"), str):
            subj = Subject(subject["path"], subject.get("sha256"))
        prov = {k: data.get(k) for k in ("stage", "inputs", "settings", "code", "weights")}
        return cls(prov, key, {str(k): str(v) for k, v in outputs.items()}, subj)

    @classmethod
    def of(cls, expected: Provenance, outputs: Mapping[str, str], subject: Subject | None) -> Record:
        """The record a unit computed with ``expected`` gets."""
        return cls(expected.as_dict(), expected.key, dict(outputs), subject)


def record_path(folder: Path, unit: str) -> Path:
    """Where a file unit's record lives: ``<folder>/.<unit>.provenance.json``."""
    return Path(folder) / f".{unit}.provenance.json"


def read_record(path: Path) -> Record | None:
    """The record at ``path``; None if there is none or it is not ours (or is too large to be one)."""
    try:
        if path.is_symlink() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        return Record.from_json(path.read_bytes())
    except OSError:
        return None


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _digest(path: Path, index: DigestIndex | None) -> str | None:
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return (index or shared_index()).sha256(path)
    except OSError:
        return None


def _ownership(
    folder: Path,
    unit: str,
    names: Sequence[str],
    subject: Subject | None,
    claims: Callable[[Path], bool] | None,
) -> tuple[Record | None, Check | None]:
    """(existing record, FOREIGN/ABSENT check or None) for a file unit."""
    record = read_record(record_path(folder, unit))
    present = [n for n in names if _exists(folder / n)]
    if record is None:
        if not present:
            return None, Check(Verdict.ABSENT, "not computed yet")
        unclaimed = [n for n in present if claims is None or not claims(folder / n)]
        if unclaimed:
            return None, Check(Verdict.FOREIGN, _foreign_text(folder / unclaimed[0]))
        return None, None
    if subject is not None and record.subject is not None and not record.subject.same(subject):
        return record, Check(
            Verdict.FOREIGN,
            f"{folder / unit} holds the output of {record.subject.path}, not of {subject.path}; "
            "two inputs map to one output: rename one of them or use another output folder",
        )
    unlisted = [n for n in present if n not in record.outputs and (claims is None or not claims(folder / n))]
    if unlisted:
        return record, Check(Verdict.FOREIGN, _foreign_text(folder / unlisted[0]))
    return record, None


def _foreign_text(path: Path) -> str:
    return (
        f"{path} exists and was not written by stamp (no provenance record of ours); "
        "it is left alone: move it away or choose another output folder"
    )


def check_files(
    folder: Path,
    unit: str,
    names: Sequence[str],
    expected: Provenance,
    *,
    subject: Subject | None = None,
    claims: Callable[[Path], bool] | None = None,
    index: DigestIndex | None = None,
) -> Check:
    """Whether the files ``names`` in ``folder`` (one unit) can be reused, replaced or must be left alone.

    ``claims(path)`` may vouch for a file without a sidecar record (an h5 carrying our record in its
    attributes); such a file is replaceable but never reused without a record.
    """
    folder = Path(folder)
    record, early = _ownership(folder, unit, names, subject, claims)
    if early is not None:
        return early
    if record is None:
        return Check(Verdict.STALE, "outputs without a provenance record")
    if record.key != expected.key:
        return Check(Verdict.STALE, expected.changes_from(record.provenance))
    if set(record.outputs) != set(names):
        return Check(Verdict.STALE, "the set of output files changed")
    for name in names:
        digest = _digest(folder / name, index)
        if digest is None:
            return Check(Verdict.STALE, f"{name} is missing")
        if digest != record.outputs[name]:
            return Check(Verdict.STALE, f"{name} changed since it was written")
    return Check(Verdict.REUSE, "same inputs, settings and code; files unchanged")


def publish_files(
    folder: Path,
    unit: str,
    staged: Mapping[str, Path],
    expected: Provenance,
    *,
    subject: Subject | None = None,
    claims: Callable[[Path], bool] | None = None,
) -> dict[str, str]:
    """Move the staged temp files (name → temp path, in order) into ``folder`` as one unit; return digests.

    Raises :class:`ForeignOutput` (and moves nothing) when an existing file is not ours. Files of the
    unit's previous record that the new unit does not have are removed (they are ours and stale).
    """
    folder = Path(folder)
    record, early = _ownership(folder, unit, list(staged), subject, claims)
    if early is not None:
        early.raise_if_foreign()
    digests = {name: file_sha256(tmp) for name, tmp in staged.items()}
    atomic_write_text(record_path(folder, unit), Record.of(expected, digests, subject).to_json())
    index = shared_index()
    for name, tmp in staged.items():
        fsync_path(tmp)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder / name)
        index.remember(folder / name, digests[name])
    for name, digest in (record.outputs if record is not None else {}).items():
        if name not in staged and _ours_to_remove(folder, name, digest):
            (folder / name).unlink(missing_ok=True)  # ours and stale: not left beside the new unit
    fsync_path(folder)
    return digests


def record_files(
    folder: Path, unit: str, names: Sequence[str], expected: Provenance, *, subject: Subject | None = None
) -> dict[str, str]:
    """Write the record of a unit whose writer put its files in place itself (whole folders moved in).

    Only for writers that establish ownership on their own (e.g. the synthetic cohort's manifest).
    """
    folder = Path(folder)
    digests = {name: file_sha256(folder / name) for name in names}
    atomic_write_text(record_path(folder, unit), Record.of(expected, digests, subject).to_json())
    return digests


def _ours_to_remove(folder: Path, name: str, digest: str) -> bool:
    """Whether a file a previous record lists may be deleted: inside ``folder`` without passing a
    symlink (records are read from folders others may write) and still the bytes we wrote."""
    rel = Path(name)
    if not rel.parts or rel.is_absolute() or ".." in rel.parts:
        return False
    target = folder / rel
    real_folder = os.path.realpath(folder)
    if os.path.realpath(target.parent) != os.path.normpath(os.path.join(real_folder, *rel.parts[:-1])):
        return False
    if target.is_symlink() or not target.is_file():
        return False
    return _digest(target, None) == digest


def _folder_files(folder: Path) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != FOLDER_RECORD:
                out.append(rel)
    return sorted(out)


def _folder_ownership(folder: Path, subject: Subject | None) -> tuple[Record | None, Check | None]:
    """(record, ABSENT/FOREIGN check or None) for a folder unit."""
    if not _exists(folder):
        return None, Check(Verdict.ABSENT, "not computed yet")
    if folder.is_symlink() or not folder.is_dir():
        return None, Check(Verdict.FOREIGN, _foreign_text(folder))
    if not any(folder.iterdir()):
        return None, Check(Verdict.ABSENT, "empty folder")
    record = read_record(folder / FOLDER_RECORD)
    if record is None:
        return None, Check(Verdict.FOREIGN, _foreign_text(folder))
    if subject is not None and record.subject is not None and not record.subject.same(subject):
        return record, Check(
            Verdict.FOREIGN,
            f"{folder} holds the output of {record.subject.path}, not of {subject.path}; two inputs map "
            "to one output folder: rename one of them or use another output folder",
        )
    return record, None


def check_folder(
    folder: Path,
    expected: Provenance,
    *,
    subject: Subject | None = None,
    index: DigestIndex | None = None,
) -> Check:
    """Whether a published folder (one unit) can be reused, replaced, or must be left alone."""
    folder = Path(folder)
    record, early = _folder_ownership(folder, subject)
    if early is not None:
        return early
    assert record is not None
    if record.key != expected.key:
        return Check(Verdict.STALE, expected.changes_from(record.provenance))
    files = _folder_files(folder)
    if files != sorted(record.outputs):
        return Check(Verdict.STALE, "the folder's files changed since it was written")
    for name in files:
        if _digest(folder / name, index) != record.outputs[name]:
            return Check(Verdict.STALE, f"{name} changed since it was written")
    return Check(Verdict.REUSE, "same inputs, settings and code; files unchanged")


def publish_folder(
    staging: Path, folder: Path, expected: Provenance, *, subject: Subject | None = None
) -> None:
    """Write the record into ``staging`` and swap it in at ``folder``; raise :class:`ForeignOutput` if not ours.

    ``staging`` is consumed (it becomes ``folder``, or is left for the caller to remove on error).
    """
    folder = Path(folder)
    _record, early = _folder_ownership(folder, subject)
    if early is not None:
        early.raise_if_foreign()
    digests = {name: file_sha256(staging / name) for name in _folder_files(staging)}
    atomic_write_text(staging / FOLDER_RECORD, Record.of(expected, digests, subject).to_json())
    publish_dir(staging, folder)
    index = shared_index()
    for name, digest in digests.items():
        index.remember(folder / name, digest)
