"""``stamp watch INBOX``: a new cohort folder lands → one ``stamp.cohort.ready`` event → one ``cohort`` run.

Completeness rule: a sub-folder ``INBOX/<name>/`` is a complete cohort once it holds a file named ``READY``
*and* a ``config.yaml`` (the STAMP config of that cohort). Whoever copies a cohort in writes ``READY`` last
(``touch READY`` after the copy has finished), so a half-copied folder is never picked up. Hidden folders
(``.name``) are ignored. The config must load (:func:`stamp.config.load_config`); one that does not is
recorded as ``invalid`` with its error and not emitted. The ``cohort/process`` deployment's trigger sets
``relative_to_config``, so relative paths inside the config are taken relative to the cohort folder.

Run-once rule: after emitting, the watcher writes ``INBOX/.stamp-watch/<name>.json`` (atomically) and never
emits for that folder again while the record exists — across restarts. The event id is deterministic
(uuid5 of the folder's resolved path, the config's sha256 and ``READY``'s mtime), so a watcher that crashed
between emitting and writing the record, or two watchers racing, send the same id twice, and the Prefect
server drops the repeat (its triggers skip an event id already seen, for 30 minutes). To run a cohort again,
delete its record and ``touch READY``.

The event is ``stamp.cohort.ready`` on resource ``stamp.cohort.<name>`` with payload ``config_path``,
``cohort_dir`` and ``config_sha256``; the ``cohort/process`` deployment (deployments/prefect.yaml) has the
trigger that starts ``cohort_flow(config_path=...)``. Emitting needs a running Prefect server
(``PREFECT_API_URL`` or ``stamp server``) with a worker on pool ``stamp-process``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow

from stamp.fileio import atomic_write_text

READY_MARKER = "READY"
CONFIG_NAME = "config.yaml"
STATE_DIR = ".stamp-watch"
EVENT_NAME = "stamp.cohort.ready"
RESOURCE_PREFIX = "stamp.cohort."
_ID_NAMESPACE = uuid.UUID("6f0c35a2-5b8e-4f5e-9d0a-7a2f3c1d9e41")

log = logging.getLogger("stamp.watch")


@dataclass(frozen=True)
class ReadyCohort:
    """A complete cohort folder that has not been emitted yet."""

    name: str
    folder: Path
    config_path: Path
    config_sha256: str
    event_id: uuid.UUID

    def payload(self) -> dict[str, str]:
        """The event payload (the trigger reads ``config_path``)."""
        return {
            "config_path": str(self.config_path),
            "cohort_dir": str(self.folder),
            "config_sha256": self.config_sha256,
        }


def state_path(inbox: Path, name: str) -> Path:
    """Where the run-once record of cohort ``name`` lives."""
    return Path(inbox) / STATE_DIR / f"{name}.json"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds both ``READY`` and ``config.yaml``."""
    return (folder / READY_MARKER).is_file() and (folder / CONFIG_NAME).is_file()


def cohort_event_id(folder: Path, config_sha256: str) -> uuid.UUID:
    """Deterministic event id: same folder, config and ``READY`` file → same id."""
    folder = folder.resolve()
    ready_mtime = (folder / READY_MARKER).stat().st_mtime_ns
    return uuid.uuid5(_ID_NAMESPACE, f"{folder}\n{config_sha256}\n{ready_mtime}")


def pending_cohorts(inbox: Path) -> list[ReadyCohort]:
    """Complete cohort folders of ``inbox`` without a run-once record, sorted by name."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise FileNotFoundError(f"watch: inbox {inbox} is not a folder; create it or fix the path")
    found = []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_complete(folder) or state_path(inbox, folder.name).exists():
            continue
        config = (folder / CONFIG_NAME).resolve()
        digest = hashlib.sha256(config.read_bytes()).hexdigest()
        found.append(
            ReadyCohort(folder.name, folder.resolve(), config, digest, cohort_event_id(folder, digest))
        )
    return found


def _record(inbox: Path, cohort: ReadyCohort, status: str, **extra: Any) -> None:
    data = {
        "cohort": cohort.name,
        "status": status,
        "event": EVENT_NAME,
        "event_id": str(cohort.event_id),
        "recorded_at": datetime.now(UTC).isoformat(),
        **cohort.payload(),
        **extra,
    }
    path = state_path(inbox, cohort.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


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


def watch_once(inbox: Path, emit: Callable[[Any], None] | None = None) -> list[str]:
    """Emit one event per new complete cohort of ``inbox``; return the names emitted.

    ``emit`` sends an event (default: :func:`emit_to_server`); tests pass a recorder.
    """
    from stamp.config import ConfigError, load_config

    inbox = Path(inbox)
    send = emit or emit_to_server
    emitted = []
    for cohort in pending_cohorts(inbox):
        try:
            load_config(cohort.config_path)
        except ConfigError as err:
            log.warning("watch: %s: invalid config, not started: %s", cohort.name, err)
            _record(inbox, cohort, "invalid", error=str(err))
            continue
        send(cohort_event(cohort))
        _record(inbox, cohort, "emitted")
        log.info("watch: %s ready → event %s (%s)", cohort.name, cohort.event_id, cohort.config_path)
        emitted.append(cohort.name)
    return emitted


def watch(
    inbox: Path,
    interval: float = 10.0,
    max_scans: int | None = None,
    emit: Callable[[Any], None] | None = None,
) -> list[str]:
    """Scan ``inbox`` every ``interval`` seconds (``max_scans`` times, default forever); return all emitted."""
    emitted: list[str] = []
    scans = 0
    while max_scans is None or scans < max_scans:
        if scans:
            time.sleep(interval)
        emitted += watch_once(inbox, emit)
        scans += 1
    return emitted


@flow(name="watch")
def watch_flow(inbox: str) -> list[str]:
    """One scan of ``inbox`` as a Prefect flow run (schedule the ``watch/process`` deployment to poll)."""
    return watch_once(Path(inbox))


def main(argv: list[str] | None = None) -> int:
    """``python -m stamp_flows.watch INBOX [--interval S] [--once]``."""
    parser = argparse.ArgumentParser(prog="python -m stamp_flows.watch", description=__doc__.split("\n")[0])
    parser.add_argument("inbox", type=Path)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between scans (default 10)")
    parser.add_argument("--once", action="store_true", help="scan once and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        names = watch(args.inbox, args.interval, max_scans=1 if args.once else None)
    except KeyboardInterrupt:
        return 0
    except (FileNotFoundError, RuntimeError) as err:
        print(err)
        return 1
    print(f"watch: emitted {len(names)} cohort(s): {', '.join(names) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
