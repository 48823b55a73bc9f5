"""``stamp watch INBOX``: a new cohort folder lands → one ``stamp.cohort.ready`` event → one ``cohort`` run.

Completeness rule: a sub-folder ``INBOX/<name>/`` is a complete cohort once it holds a file named ``READY``
*and* a ``config.yaml`` (the STAMP config of that cohort). Whoever copies a cohort in writes ``READY`` last
(``touch READY`` after the copy has finished), so a half-copied folder is never picked up. Hidden folders
(``.name``) are ignored.

Everything in the INBOX is untrusted (DESIGN contract 7). The watcher is started by IT with trusted
settings (:class:`WatchSettings`): a private state folder (default ``$STAMP_HOME/watch``, 0700, never
inside the INBOX), a work root (each cohort's outputs go under ``<work root>/<name>/``), read-only data
roots and the deployments a cohort may name. A cohort folder, ``config.yaml`` or ``READY`` that is a
symlink or not a regular file is refused, never followed; a config larger than 1 MiB, not UTF-8, not
valid YAML (alias bombs, deep nesting), not matching the schema or naming paths outside its folders
(:mod:`stamp.confinement`) is recorded ``invalid`` with a short reason that holds no value from the file,
and the other cohorts go on.

A valid config is snapshotted (its exact bytes plus the confinement, 0600) into the state folder, and the
event carries the snapshot's path and sha256: the ``cohort/process`` trigger (deployments/prefect.yaml)
starts ``cohort_flow(snapshot_path=..., snapshot_sha256=...)``, which runs exactly those bytes, confined,
or refuses a changed snapshot. What happens to ``config.yaml`` in the INBOX afterwards does not matter.

Run-once rule: after emitting, the watcher writes ``<state>/records/<name>.json`` (atomically) and never
emits for that folder again while the record exists, across restarts. The event id is deterministic
(uuid5 of the folder's path, the config's sha256 and ``READY``'s mtime), so a watcher that crashed between
emitting and recording, or two watchers racing, send the same id twice, and the Prefect server drops the
repeat (its triggers skip an event id already seen, for 30 minutes). To run a cohort again, delete its
record and ``touch READY``. Emitting needs a running Prefect server (``PREFECT_API_URL`` or
``stamp server``) with a worker on pool ``stamp-process`` running as the watcher's user (it reads the
snapshots).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow

from stamp.cohort.tables import safe_name
from stamp.config import MAX_CONFIG_BYTES, ConfigError, parse_config
from stamp.confinement import Confinement, confine_config, write_snapshot
from stamp.fileio import atomic_write_text, make_private_dir, unsafe_folder_reason

READY_MARKER = "READY"
CONFIG_NAME = "config.yaml"
EVENT_NAME = "stamp.cohort.ready"
RESOURCE_PREFIX = "stamp.cohort."
_ID_NAMESPACE = uuid.UUID("6f0c35a2-5b8e-4f5e-9d0a-7a2f3c1d9e41")

log = logging.getLogger("stamp.watch")


def _stamp_home() -> Path:
    return Path(os.environ.get("STAMP_HOME") or Path.home() / ".stamp").expanduser()


@dataclass(frozen=True)
class WatchSettings:
    """The watcher's trusted settings (from IT's command line, never from a cohort)."""

    inbox: Path
    state_dir: Path
    work_root: Path
    data_roots: tuple[Path, ...] = ()
    deployments: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def create(
        cls,
        inbox: Path | str,
        state_dir: Path | str | None = None,
        work_root: Path | str | None = None,
        data_roots: Iterable[Path | str] = (),
        deployments: Iterable[str] = (),
    ) -> WatchSettings:
        """Resolve and check the settings; create the state folder (0700).

        Defaults: state ``$STAMP_HOME/watch``, work root ``$STAMP_HOME/work``. Raises ValueError (one line)
        for a state folder or work root inside the inbox, or a state folder others can write or a symlink.
        """
        inbox = Path(os.path.realpath(inbox))
        if not inbox.is_dir():
            raise FileNotFoundError(f"watch: inbox {inbox} is not a folder; create it or fix the path")
        state = Path(os.path.abspath(state_dir or _stamp_home() / "watch"))
        work = Path(os.path.realpath(work_root or _stamp_home() / "work"))
        for what, path in (("state folder", Path(os.path.realpath(state))), ("work root", work)):
            if path == inbox or path.is_relative_to(inbox):
                raise ValueError(
                    f"watch: {what} {path} is inside the inbox {inbox}; droppers could change it"
                )
        make_private_dir(state)
        reason = unsafe_folder_reason(state)
        if reason:
            raise ValueError(f"watch: state folder {state} {reason}; give a folder only this user can write")
        for sub in ("records", "snapshots"):
            make_private_dir(state / sub)
            reason = unsafe_folder_reason(state / sub)
            if reason:
                raise ValueError(f"watch: state folder {state / sub} {reason}; remove it")
        roots = tuple(Path(os.path.realpath(p)) for p in data_roots)
        return cls(inbox, state, work, roots, frozenset(deployments))


@dataclass(frozen=True)
class ReadyCohort:
    """A complete cohort folder that has not been recorded yet."""

    name: str
    folder: Path
    config_sha256: str
    event_id: uuid.UUID
    config: bytes = field(repr=False)
    snapshot_path: Path | None = None
    snapshot_sha256: str | None = None

    def payload(self) -> dict[str, str]:
        """The event payload (the trigger reads ``snapshot_path`` and ``snapshot_sha256``)."""
        return {
            "cohort_dir": str(self.folder),
            "config_path": str(self.folder / CONFIG_NAME),
            "config_sha256": self.config_sha256,
            "snapshot_path": str(self.snapshot_path),
            "snapshot_sha256": str(self.snapshot_sha256),
        }


class CohortRefused(Exception):
    """A cohort folder that is not run; the message is a short reason with nothing from its files."""


def state_path(state_dir: Path, name: str) -> Path:
    """Where the run-once record of cohort ``name`` lives."""
    return Path(state_dir) / "records" / f"{safe_name(name)}.json"


def cohort_event_id(folder: Path, config_sha256: str, ready_mtime_ns: int) -> uuid.UUID:
    """Deterministic event id: same folder, config and ``READY`` file → same id."""
    return uuid.uuid5(_ID_NAMESPACE, f"{folder}\n{config_sha256}\n{ready_mtime_ns}")


def _regular(dir_fd: int, name: str) -> os.stat_result | None:
    """lstat of ``name`` in the folder; None if missing; refused when a symlink or not a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise CohortRefused(f"{name} is a symbolic link or not a regular file")
    return st


def _read_config(dir_fd: int) -> bytes:
    try:
        fd = os.open(CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as err:
        raise CohortRefused(f"{CONFIG_NAME} cannot be opened ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise CohortRefused(f"{CONFIG_NAME} is a symbolic link or not a regular file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise CohortRefused(f"{CONFIG_NAME} is larger than 1 MiB")
    return data


def inspect_cohort(inbox: Path, name: str) -> ReadyCohort | None:
    """The cohort ``inbox/name`` if complete, None if not (yet); raises CohortRefused for a hostile one."""
    try:
        dir_fd = os.open(inbox / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        if os.path.islink(inbox / name):
            raise CohortRefused("cohort folder is a symbolic link; not followed") from None
        if not os.path.isdir(inbox / name):
            return None  # a loose file
        raise CohortRefused(f"cohort folder cannot be opened ({err.strerror})") from None
    try:
        ready = _regular(dir_fd, READY_MARKER)
        if ready is None or _regular(dir_fd, CONFIG_NAME) is None:
            return None
        data = _read_config(dir_fd)
    finally:
        os.close(dir_fd)
    folder = inbox / name
    digest = hashlib.sha256(data).hexdigest()
    return ReadyCohort(name, folder, digest, cohort_event_id(folder, digest, ready.st_mtime_ns), data)


def confinement(settings: WatchSettings, cohort: ReadyCohort) -> Confinement:
    """The folders cohort ``cohort`` may read and write."""
    work_dir = settings.work_root / safe_name(cohort.name)
    return Confinement(cohort.folder, work_dir, settings.data_roots, settings.deployments)


def _record(
    settings: WatchSettings, name: str, status: str, cohort: ReadyCohort | None, **extra: Any
) -> None:
    data: dict[str, Any] = {"cohort": name, "status": status, "recorded_at": datetime.now(UTC).isoformat()}
    if cohort is not None:
        data |= {"event": EVENT_NAME, "event_id": str(cohort.event_id), **cohort.payload()}
    atomic_write_text(
        state_path(settings.state_dir, name), json.dumps(data | extra, indent=1) + "\n", mode=0o600
    )


def _reason(exc: Exception) -> str:
    """A short reason for a record: never the file's contents."""
    if isinstance(exc, CohortRefused):
        return str(exc)
    if isinstance(exc, ConfigError):
        return "; ".join(exc.summary)[:500]
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} ({exc.strerror})"
    return f"{type(exc).__name__} while checking the cohort"


def cohort_event(cohort: ReadyCohort) -> Any:
    """The Prefect event announcing ``cohort``."""
    from prefect.events import Event, Resource

    resource = Resource(
        {"prefect.resource.id": RESOURCE_PREFIX + cohort.name, "prefect.resource.name": cohort.name}
    )
    return Event(id=cohort.event_id, event=EVENT_NAME, resource=resource, payload=cohort.payload())


async def _emit_async(events: list[Any]) -> None:
    from prefect.events.clients import get_events_client

    async with get_events_client(checkpoint_every=1) as client:
        for event in events:
            await client.emit(event)


def emit_to_server(event: Any) -> None:
    """Send one event to the configured Prefect server and wait until it is acknowledged."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise RuntimeError(
            "watch: no Prefect server to send events to; start one (`stamp server --background`) "
            "or set PREFECT_API_URL, and run a worker: `prefect worker start --pool stamp-process`"
        )
    asyncio.run(_emit_async([event]))


def _prepare(settings: WatchSettings, name: str) -> ReadyCohort | None:
    """Inspect, validate, confine and snapshot one cohort; None when incomplete."""
    cohort = inspect_cohort(settings.inbox, name)
    if cohort is None:
        return None
    conf = confinement(settings, cohort)
    confine_config(parse_config(cohort.config, cohort.folder / CONFIG_NAME), conf)
    path, sha = write_snapshot(
        settings.state_dir / "snapshots", name, cohort.config, conf, cohort.folder / CONFIG_NAME
    )
    return ReadyCohort(name, cohort.folder, cohort.config_sha256, cohort.event_id, cohort.config, path, sha)


def watch_once(settings: WatchSettings, emit: Callable[[Any], None] | None = None) -> list[str]:
    """Emit one event per new complete cohort of the inbox; return the names emitted.

    A cohort that cannot be run is recorded ``invalid`` and the scan goes on. ``emit`` sends an event
    (default: :func:`emit_to_server`; tests pass a recorder); its errors stop the scan unrecorded, so
    the next scan retries.
    """
    send = emit or emit_to_server
    emitted = []
    for name in sorted(os.listdir(settings.inbox)):
        if name.startswith(".") or state_path(settings.state_dir, name).exists():
            continue
        try:
            cohort = _prepare(settings, name)
        except Exception as exc:  # noqa: BLE001 - any file may be hostile; one bad cohort never stops the rest
            reason = _reason(exc)
            log.warning("watch: %s: not started: %s", name, reason)
            _record(settings, name, "invalid", None, error=reason)
            continue
        if cohort is None:
            continue
        send(cohort_event(cohort))
        _record(settings, name, "emitted", cohort)
        log.info("watch: %s ready → event %s (%s)", name, cohort.event_id, cohort.snapshot_path)
        emitted.append(name)
    return emitted


def watch(
    settings: WatchSettings,
    interval: float = 10.0,
    max_scans: int | None = None,
    emit: Callable[[Any], None] | None = None,
) -> list[str]:
    """Scan the inbox every ``interval`` seconds (``max_scans`` times, default forever); return all emitted."""
    emitted: list[str] = []
    scans = 0
    while max_scans is None or scans < max_scans:
        if scans:
            time.sleep(interval)
        emitted += watch_once(settings, emit)
        scans += 1
    return emitted


@flow(name="watch")
def watch_flow(
    inbox: str,
    state_dir: str | None = None,
    work_root: str | None = None,
    data_roots: list[str] | None = None,
    allow_deployments: list[str] | None = None,
) -> list[str]:
    """One scan of ``inbox`` as a Prefect flow run (schedule the ``watch/process`` deployment to poll)."""
    settings = WatchSettings.create(inbox, state_dir, work_root, data_roots or (), allow_deployments or ())
    return watch_once(settings)


def main(argv: list[str] | None = None) -> int:
    """``python -m stamp_flows.watch ...``: the same as ``stamp watch ...``."""
    import sys

    from stamp.cli import main as stamp_main

    return stamp_main(["watch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
