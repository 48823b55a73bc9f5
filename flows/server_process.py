"""The local Prefect server process: Prefect's API + UI under uvicorn, with a lean start and an idle shutdown.

Run as ``python -m stamp_flows.server_process --host H --port P [--idle-timeout S]`` by
:func:`stamp_flows.server.spawn_server`, in the environment :func:`stamp_flows.server.server_env` builds
(auth, CSRF, CORS, database). It serves the same application ``prefect server start`` serves
(``create_app(final=True)`` with every service: event triggers for the INBOX automations, the scheduler,
the UI), without loading Prefect's command line, and:

- **lean start**: the database migrations and the block-type registration run on the first start of a
  Prefect version against a database and are skipped afterwards (a marker in ``PREFECT_HOME`` records
  version and database; a changed version, database URL or SQLite file runs them again);
- **idle shutdown** (``--idle-timeout`` seconds, 0 = never): the server exits when no request came in
  for that long and no ``stamp`` command holds the users lock (``$PREFECT_HOME/stamp-server.users``,
  which every command using the server holds, shared, while it runs);
- it exits as well when its record in ``$PREFECT_HOME/stamp-server.json`` no longer names it (the
  record was removed by ``stamp server --stop`` or replaced), so no orphan keeps a port.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from stamp.fileio import atomic_write_text

MARKER_FILE = "stamp-server-db.json"
USERS_LOCK = "stamp-server.users"
CHECK_EVERY_S = 5.0


def _database_identity(home: Path) -> dict[str, Any]:
    """What the lean-start marker must match: the database URL and, for SQLite, the file's identity."""
    url = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or os.environ.get(
        "PREFECT_API_DATABASE_CONNECTION_URL"
    )
    if url:
        return {"database": url}
    db = home / "prefect.db"
    try:
        st = os.stat(db)
    except FileNotFoundError:
        return {"database": "sqlite-default", "file": None}
    return {"database": "sqlite-default", "file": [st.st_dev, st.st_ino]}


def _marker(home: Path) -> dict[str, Any]:
    # the version from the metadata: importing prefect here would fix its settings before ours are set
    return {"prefect": importlib.metadata.version("prefect"), **_database_identity(home)}


def lean_start_settings(home: Path) -> dict[str, str]:
    """Settings that skip migrations and block registration when the marker says both already ran."""
    try:
        recorded = json.loads((home / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if recorded != _marker(home):
        return {}
    return {
        "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
    }


class ActivityTracker:
    """ASGI wrapper that notes the time of the last HTTP or websocket request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = time.monotonic()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            self.last = time.monotonic()
        await self.app(scope, receive, send)


def _record_names_us(home: Path) -> bool:
    try:
        info = json.loads((home / "stamp-server.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        int(info.get("pid", -1)) == os.getpid()
        and info.get("host", socket.gethostname()) == socket.gethostname()
    )


def _users_lock_free(home: Path) -> int | None:
    """An fd holding the users lock exclusively when no command holds it, else None."""
    fd = os.open(home / USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _watch(server: Any, tracker: ActivityTracker, home: Path, idle_timeout: float) -> None:
    """Stop ``server`` when its record is gone or it has been idle for ``idle_timeout`` seconds."""
    while not server.should_exit:
        time.sleep(CHECK_EVERY_S)
        if not server.started:
            continue
        if not _record_names_us(home):
            server.should_exit = True
            return
        if idle_timeout <= 0 or time.monotonic() - tracker.last < idle_timeout:
            continue
        fd = _users_lock_free(home)
        if fd is None:  # a command is using the server: that is activity
            tracker.last = time.monotonic()
            continue
        # held until this process exits: a command arriving now waits, then starts a new server
        if _record_names_us(home):
            (home / "stamp-server.json").unlink(missing_ok=True)
        server.should_exit = True
        return


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, idle shutdown or loss of the record."""
    ap = argparse.ArgumentParser(prog="python -m stamp_flows.server_process")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--idle-timeout", type=float, default=0.0)
    args = ap.parse_args(argv)
    home = Path(os.environ["PREFECT_HOME"])
    lean = lean_start_settings(home)
    os.environ.update(lean)

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import PREFECT_SERVER_API_KEEPALIVE_TIMEOUT

    tracker = ActivityTracker(create_app(final=True))
    config = uvicorn.Config(
        tracker,
        host=args.host,
        port=args.port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        log_level=os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "warning").lower(),
        lifespan="on",
    )
    server = uvicorn.Server(config)
    watcher = threading.Thread(
        target=_watch, args=(server, tracker, home, args.idle_timeout), daemon=True, name="stamp-idle"
    )
    watcher.start()
    if not lean:
        threading.Thread(target=_write_marker_once_started, args=(server, home), daemon=True).start()
    server.run()
    return 0


def _write_marker_once_started(server: Any, home: Path) -> None:
    """After a start that ran migrations and block registration, record that they ran."""
    while not server.started and not server.should_exit:
        time.sleep(0.2)
    if server.started:
        atomic_write_text(home / MARKER_FILE, json.dumps(_marker(home)), mode=0o600)


if __name__ == "__main__":
    raise SystemExit(main())
