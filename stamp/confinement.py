"""A cohort dropped in the INBOX is untrusted: every path it names must stay inside folders IT allowed.

``stamp watch`` is started by IT with trusted settings: the cohort folder (``INBOX/<name>``), the cohort's
work folder (``<work root>/<name>``, where all its outputs go), read-only data roots and the deployments a
cohort may name. Those make a :class:`Confinement`; nothing in the dropped config can change them.

Rules (:func:`confine_config`), after resolving symlinks and ``..``:

* **Outputs** (``output_dir``, ``cache_dir``): a relative path goes under the work folder; an absolute one
  must lie inside it.
* **Inputs** (every other path key): a relative path under one of this config's relative outputs names
  that output, so stages chain (``crossval.feature_dir: features`` reads what
  ``preprocessing.output_dir: features`` wrote); any other relative path is taken in the cohort folder,
  ``heatmaps.slide_paths`` relative to ``wsi_dir``. Each must lie inside the cohort folder, its work folder
  or a data root.
* **Table entries** (``wsi_list`` lines, slides found under ``wsi_dir``, slide-table ``FILENAME``):
  :func:`check_tables` checks them before the run, and while :func:`enforced` is active the readers
  check each path again when they read it (:func:`check_input`; a no-op outside a watcher run).
* **orchestration**: each named deployment must be allow-listed; ``prefect_api_url``, ``prefect_home``
  and ``result_dir`` are ignored (the worker's own settings apply).

The watcher hands the validated config to the ``cohort`` flow as a snapshot (:func:`write_snapshot`):
one JSON file in its private state folder holding the exact config text and the confinement; the flow
runs it only if its sha256 is the one in the event (:func:`load_snapshot`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stamp.config import MAX_CONFIG_BYTES, ConfigError, parse_config
from stamp.config_models import OrchestrationConfig, StampConfig

__all__ = [
    "OUTPUT_KEYS",
    "Confinement",
    "check_input",
    "check_tables",
    "confine_config",
    "enforced",
    "load_snapshot",
    "write_snapshot",
]

_logger = logging.getLogger("stamp")

#: Path keys that a stage writes; every other path key of the schema is read.
OUTPUT_KEYS = frozenset({"output_dir", "cache_dir"})
_IGNORED_ORCHESTRATION = ("prefect_api_url", "prefect_home", "result_dir")
_SNAPSHOT_MAX_BYTES = 8 * MAX_CONFIG_BYTES  # JSON escaping may grow the config text


@dataclass(frozen=True)
class Confinement:
    """The trusted folders of one watcher-started cohort run (from IT's settings, never from the config)."""

    cohort_dir: Path
    work_dir: Path
    data_roots: tuple[Path, ...] = ()
    deployments: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def input_roots(self) -> tuple[Path, ...]:
        """Resolved folders that inputs may come from: the cohort folder, its work folder, the data roots."""
        return tuple(_real(p) for p in (self.cohort_dir, self.work_dir, *self.data_roots))

    def to_json(self) -> dict[str, Any]:
        return {
            "cohort_dir": str(self.cohort_dir),
            "work_dir": str(self.work_dir),
            "data_roots": [str(p) for p in self.data_roots],
            "deployments": sorted(self.deployments),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Confinement:
        return cls(
            Path(data["cohort_dir"]),
            Path(data["work_dir"]),
            tuple(Path(p) for p in data["data_roots"]),
            frozenset(data["deployments"]),
        )

    def describe_inputs(self) -> str:
        roots = ", ".join(str(p) for p in self.data_roots) or "none"
        return f"the cohort folder {self.cohort_dir}, its work folder {self.work_dir} and the data roots ({roots})"


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _outside_inputs(label: str, real: Path, conf: Confinement, key: str) -> ConfigError:
    return ConfigError(
        f"{label} resolves to {real}, outside {conf.describe_inputs()}; move it into the cohort folder "
        "or ask IT to allow-list its folder (`stamp watch --data-root`)",
        f"{key}: input outside the cohort folder and the data roots",
    )


# --------------------------------------------------------------------------- config paths


def _input(value: Path, key: str, base: Path, conf: Confinement, outputs: list[Path]) -> Path:
    if value.is_absolute():
        candidate = value
    else:
        norm = Path(os.path.normpath(value))
        chained = any(norm == out or norm.is_relative_to(out) for out in outputs)
        candidate = (conf.work_dir if chained else base) / value
    real = _real(candidate)
    if not _inside(real, conf.input_roots):
        raise _outside_inputs(f"{key}: {value}", real, conf, key)
    return real


def _output(value: Path, key: str, conf: Confinement) -> Path:
    real = _real(value if value.is_absolute() else conf.work_dir / value)
    if not _inside(real, (_real(conf.work_dir),)):
        raise ConfigError(
            f"{key}: {value} resolves to {real}, outside the cohort's work folder {conf.work_dir}; "
            "use a relative path (it goes under the work folder)",
            f"{key}: output outside the cohort's work folder",
        )
    return real


def _relative_outputs(cfg: StampConfig) -> list[Path]:
    found = []
    for name in type(cfg).model_fields:
        section = getattr(cfg, name)
        for key in OUTPUT_KEYS:
            value = getattr(section, key, None)
            if isinstance(value, Path) and not value.is_absolute():
                found.append(Path(os.path.normpath(value)))
    return found


def _confine_section(prefix: str, section: BaseModel, conf: Confinement, outputs: list[Path]) -> BaseModel:
    updates: dict[str, Any] = {}
    for key in type(section).model_fields:
        value = getattr(section, key)
        dotted = f"{prefix}.{key}"
        if key == "slide_paths" and value is not None:
            wsi_dir = updates["wsi_dir"]  # heatmaps: wsi_dir precedes slide_paths, which are relative to it
            updates[key] = [_input(p, f"{dotted}[{i}]", wsi_dir, conf, []) for i, p in enumerate(value)]
        elif isinstance(value, Path):
            updates[key] = (
                _output(value, dotted, conf)
                if key in OUTPUT_KEYS
                else _input(value, dotted, conf.cohort_dir, conf, outputs)
            )
        elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
            updates[key] = [
                _input(p, f"{dotted}[{i}]", conf.cohort_dir, conf, outputs) for i, p in enumerate(value)
            ]
        elif isinstance(value, BaseModel):
            updates[key] = _confine_section(dotted, value, conf, outputs)
    return section.model_copy(update=updates)


def _orchestration(orch: OrchestrationConfig, conf: Confinement) -> OrchestrationConfig:
    for stage, name in orch.deployments.items():
        if name not in conf.deployments:
            raise ConfigError(
                f"orchestration.deployments.{stage}: deployment {name[:80]!r} is not allowed for INBOX cohorts "
                f"(allowed: {', '.join(sorted(conf.deployments)) or 'none'}); ask IT to allow it "
                "(`stamp watch --allow-deployment`)",
                f"orchestration.deployments.{stage}: deployment not allowed by the watcher",
            )
    ignored = [key for key in _IGNORED_ORCHESTRATION if getattr(orch, key) is not None]
    if ignored:
        _logger.warning(
            "orchestration.%s of an INBOX cohort ignored (the worker's own settings apply)",
            ", ".join(ignored),
        )
    return orch.model_copy(update=dict.fromkeys(ignored))


def confine_config(cfg: StampConfig, conf: Confinement) -> StampConfig:
    """``cfg`` with every path resolved and checked against ``conf`` (see the module doc).

    Raises :class:`ConfigError` naming the key, the path and where it resolves to.
    """
    outputs = _relative_outputs(cfg)
    updates: dict[str, Any] = {}
    for name in type(cfg).model_fields:
        section = getattr(cfg, name)
        if isinstance(section, OrchestrationConfig):
            updates[name] = _orchestration(section, conf)
        elif isinstance(section, BaseModel):
            updates[name] = _confine_section(name, section, conf, outputs)
    return cfg.model_copy(update=updates)


# --------------------------------------------------------------------------- paths read at run time

_active: Confinement | None = None


@contextmanager
def enforced(conf: Confinement) -> Iterator[None]:
    """While active, :func:`check_input` refuses paths outside ``conf``'s input folders (this process)."""
    global _active
    before, _active = _active, conf
    try:
        yield
    finally:
        _active = before


def check_input(path: str | os.PathLike[str], label: str) -> Path:
    """``path``, unchanged; inside :func:`enforced`, raise ConfigError when it resolves outside the inputs.

    ``label`` names where the path came from, e.g. ``"<wsi_list>: entry 'x.svs'"``.
    """
    conf = _active
    if conf is not None:
        real = _real(path)
        if not _inside(real, conf.input_roots):
            raise _outside_inputs(label, real, conf, label.split(":", 1)[0])
    return Path(path)


def check_tables(cfg: StampConfig, conf: Confinement) -> None:
    """Check the paths that tables and folders of ``cfg`` (already confined) name, before a run.

    ``wsi_list`` entries, the slides under ``wsi_dir`` and slide-table ``FILENAME`` values; files not
    there yet are left to the stage that reads them (which checks again while :func:`enforced`).
    """
    from stamp.cohort.feature_files import feature_path
    from stamp.cohort.tables import cell_text, read_table
    from stamp.slides.discovery import find_slides

    with enforced(conf):
        for sec in (cfg.preprocessing, cfg.heatmaps):
            if sec is None:
                continue
            wsi_list = getattr(sec, "wsi_list", None)
            if wsi_list is not None and wsi_list.is_file():
                find_slides(sec.wsi_dir, wsi_list)
            elif wsi_list is None and getattr(sec, "slide_paths", None) is None and sec.wsi_dir.is_dir():
                find_slides(sec.wsi_dir)
        for tsec in (cfg.training, cfg.crossval, cfg.deployment, cfg.patient_encoding):
            table = getattr(tsec, "slide_table", None)
            if tsec is None or table is None or not table.is_file():
                continue
            feature_dir = getattr(tsec, "feature_dir", None) or getattr(tsec, "feat_dir")  # noqa: B009
            df = read_table(table, [tsec.patient_label, tsec.filename_label], what="slide table")
            for raw in df[tsec.filename_label]:
                name = cell_text(raw)
                if name is not None:
                    feature_path(feature_dir, name, label=f"{table}: {tsec.filename_label} {name!r}")


# --------------------------------------------------------------------------- snapshots


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_snapshot(
    folder: Path, name: str, config: bytes, conf: Confinement, source: Path
) -> tuple[Path, str]:
    """Write the validated ``config`` bytes and ``conf`` to ``folder`` (0600); return the file and its sha256.

    ``folder`` must be private to this user (the watcher's state folder).
    """
    from stamp.cohort.tables import safe_name
    from stamp.fileio import atomic_write_bytes, make_private_dir, unsafe_folder_reason

    make_private_dir(folder)
    reason = unsafe_folder_reason(folder)
    if reason:
        raise ValueError(f"snapshot folder {folder} {reason}; give a folder only this user can write")
    digest = _sha256(config)
    body = {"cohort": name, "source": str(source), "config_sha256": digest, "config": config.decode("utf-8")}
    data = json.dumps({**body, **conf.to_json()}, indent=1, sort_keys=True).encode()
    path = folder / f"{safe_name(name)}-{digest[:16]}.json"
    atomic_write_bytes(path, data, mode=0o600)
    return path, _sha256(data)


def _read_private(path: Path) -> bytes:
    from stamp.fileio import unsafe_folder_reason

    reason = unsafe_folder_reason(path.parent)
    if reason:
        raise ConfigError(
            f"{path}: its folder {reason}; snapshots are only taken from the watcher's private state folder",
            "snapshot folder is not private",
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the snapshot ({err.strerror})", "snapshot unreadable"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ConfigError(
                f"{path}: not a regular file of this user that only it can write; not a watcher snapshot",
                "snapshot is not a private file",
            )
        data = f.read(_SNAPSHOT_MAX_BYTES + 1)
    if len(data) > _SNAPSHOT_MAX_BYTES:
        raise ConfigError(f"{path}: too large for a snapshot", "snapshot too large")
    return data


def load_snapshot(path: str | os.PathLike[str], sha256: str) -> tuple[StampConfig, Confinement, str]:
    """The confined config of a watcher snapshot, its confinement and the config's original path.

    Refuses (ConfigError, one line) a snapshot whose sha256 is not ``sha256``, or that is not a private
    file of this user.
    """
    path = Path(path)
    data = _read_private(path)
    digest = _sha256(data)
    if digest != sha256:
        raise ConfigError(
            f"{path}: sha256 is {digest}, the event says {sha256}; the snapshot changed after the watcher "
            "validated it, so it is not run (re-drop the cohort: delete its watch record and touch READY)",
            "snapshot digest mismatch",
        )
    meta = json.loads(data)
    config = meta["config"].encode("utf-8")
    if _sha256(config) != meta["config_sha256"]:
        raise ConfigError(f"{path}: the config in the snapshot does not match its digest", "snapshot corrupt")
    conf = Confinement.from_json(meta)
    cfg = parse_config(config, meta["source"])
    return confine_config(cfg, conf), conf, str(meta["source"])
