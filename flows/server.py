"""The local Prefect server + UI that ``stamp`` commands reuse: start, record, find, stop.

A command that needs a Prefect API and has none configured finds the server recorded under its
``PREFECT_HOME`` or starts one in the background (:func:`find_or_start_server`): the same server
``stamp server`` runs, which then stays up until it has been idle for ``STAMP_SERVER_IDLE_MINUTES``
(default 30; ``stamp server --stop`` stops it at once). Later commands pay only the client's cost. Two
commands starting at once start one server (a lock around find-or-start); a record whose process died,
or whose PID now belongs to another process, is replaced.

The server process (:mod:`stamp_flows.server_process`) runs on 127.0.0.1 with the same ``PREFECT_HOME``
as the commands, so runs made earlier show up in its UI too. Its URL, PID and start time are written to
``$PREFECT_HOME/stamp-server.json`` (0600) when it is spawned; a command waits for its health check only
when it is about to run its flow, so the server's start overlaps the command's own imports, config
validation and slide discovery.

Secure by default (security review H1): the server always requires an auth string — the one IT sets in
``PREFECT_SERVER_API_AUTH_STRING``, else one generated on first start into
``$PREFECT_HOME/stamp-server-auth`` (0600) that ``stamp`` commands send to this server only — with
CSRF protection on and CORS limited to the UI's own origin, so neither another local user nor a web
page open in a browser on the machine can start runs. The server has no TLS of its own: for a
routable ``host``, put a TLS proxy in front and give its URL as ``public_url``.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stamp.fileio import (
    atomic_write_text,
    make_private_dir,
    pid_alive,
    private_file_text,
    process_start_ticks,
)
from stamp_flows.api_urls import check_api_url, is_loopback_url
from stamp_flows.server_process import USERS_LOCK

SERVER_FILE = "stamp-server.json"
AUTH_FILE = "stamp-server-auth"
START_LOCK = "stamp-server.start.lock"
LOG_FILE = "stamp-server.log"
AUTH_USER = "stamp"
DEFAULT_IDLE_MINUTES = 30.0
DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")


def server_file(home: Path) -> Path:
    """The file where the local server's URL, PID and start time are recorded."""
    return home / SERVER_FILE


def auth_file(home: Path) -> Path:
    """The 0600 file holding the auth string of the server that runs under ``home``."""
    return home / AUTH_FILE


def idle_timeout_s() -> float:
    """Seconds a server started by a command waits idle before it exits (``STAMP_SERVER_IDLE_MINUTES``)."""
    raw = os.environ.get("STAMP_SERVER_IDLE_MINUTES", "")
    try:
        minutes = float(raw) if raw else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ValueError(
            f"STAMP_SERVER_IDLE_MINUTES={raw!r}: expected minutes as a number (0 = never stop)"
        ) from None
    return max(minutes, 0.0) * 60.0


def server_is_healthy(api_url: str, timeout: float = 1.0) -> bool:
    """True when ``<api_url>/health`` answers ``true`` within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def recorded_server(home: Path) -> dict[str, Any] | None:
    """What was recorded for the server under ``home`` (api_url, ui_url, pid, started), if ours alone.

    A record that others could have written (not ours, or group/other-readable/writable) is not
    trusted (L9).
    """
    text = private_file_text(server_file(home))
    if text is None:
        return None
    try:
        info = json.loads(text)
        record: dict[str, Any] = {
            "api_url": str(info["api_url"]),
            "ui_url": str(info["ui_url"]),
            "pid": int(info["pid"]),
        }
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(info.get("started"), int):
        record["started"] = info["started"]
    if isinstance(info.get("idle_timeout_s"), (int, float)):
        record["idle_timeout_s"] = float(info["idle_timeout_s"])
    if isinstance(info.get("host"), str):
        record["host"] = info["host"]
    return record


def recorded_elsewhere(info: dict[str, Any]) -> bool:
    """True when the record was written on another machine sharing this ``PREFECT_HOME`` (e.g. an NFS home
    on a cluster): its PID means nothing here, and its server is not ours to replace or stop."""
    return info.get("host", socket.gethostname()) != socket.gethostname()


def record_is_live(info: dict[str, Any]) -> bool:
    """True when the recorded process still runs: same PID and, when recorded, the same start time."""
    pid = int(info["pid"])
    if recorded_elsewhere(info) or pid <= 1 or not pid_alive(pid):
        return False
    return "started" not in info or process_start_ticks(pid) == info["started"]


def running_local_server(home: Path) -> str | None:
    """API URL of a live, healthy server recorded under ``home``, else None."""
    info = recorded_server(home)
    if info is None or not record_is_live(info):
        return None
    url = str(info["api_url"])
    return url if server_is_healthy(url) else None


def server_auth_string(home: Path) -> str:
    """The auth string the server requires: IT's ``PREFECT_SERVER_API_AUTH_STRING``, else this home's file.

    The file is created on first use with a random secret, mode 0600; one that others could read or
    that is not ours is refused rather than used (a planted credential would let its author in).
    """
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        return os.environ["PREFECT_SERVER_API_AUTH_STRING"]
    path = auth_file(home)
    if not os.path.lexists(path):
        atomic_write_text(path, f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n", mode=0o600)
    secret = private_file_text(path)
    if secret is None:
        raise PermissionError(
            f"{path}: the server's auth string must be a regular file of this user with mode 0600; "
            "remove it (a new one is generated) or fix its owner and mode"
        )
    return secret


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_database_url(url: str) -> str:
    """``url`` if it names a database Prefect's server can use (PostgreSQL via asyncpg, or SQLite)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in DATABASE_SCHEMES:
        raise ValueError(
            f"--database: {scheme or url!r} is not a database Prefect's server can use; give "
            "postgresql+asyncpg://USER@HOST:PORT/DB (password in PGPASSFILE, ~/.pgpass or PGPASSWORD, "
            "never on the command line) or sqlite+aiosqlite:///PATH"
        )
    return url


def server_env(
    home: Path, host: str, port: int, public_url: str | None = None, database: str | None = None
) -> dict[str, str]:
    """The environment of the server process: auth on, CSRF on, CORS pinned to the UI's origin.

    ``database`` (default: SQLite under ``home``) is the server's database URL; PostgreSQL is the
    one for shared use (several workers, a watcher and many runs at once).
    """
    local_api = f"http://{host}:{port}/api"
    ui_api = check_api_url(public_url.rstrip("/") + "/api", "--public-url") if public_url else local_api
    env = {**os.environ, "PREFECT_HOME": str(home)}
    for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"):
        env.pop(key, None)  # client settings of the caller are not the server's
    env.update(
        # the UI asks /ui-settings where the API is: without these it answers port 4200
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=ui_api,
        PREFECT_SERVER_API_AUTH_STRING=server_auth_string(home),
        PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED="true",
        PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=_origin(ui_api),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    if database:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = check_database_url(database)
    return env


@dataclass
class SpawnedServer:
    """A server process that was started and recorded, not necessarily answering yet."""

    proc: subprocess.Popen[bytes] | None
    pid: int
    api_url: str
    log: Path


def spawn_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    public_url: str | None = None,
    database: str | None = None,
    idle_timeout: float = 0.0,
) -> SpawnedServer:
    """Start the server process in its own session and record it; do not wait for it to answer.

    A ``host`` other than loopback needs ``public_url``: the ``https://`` URL of the TLS proxy in
    front of the server, which the UI then calls (plain HTTP across a network is refused).
    """
    if not is_loopback_url(f"http://{host}/") and not public_url:
        raise ValueError(
            f"--host {host} binds the server to a network: put a TLS proxy in front of it and pass its "
            "https:// URL as --public-url (README 'Deploying for a hospital')"
        )
    make_private_dir(home)
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    log = home / LOG_FILE
    env = server_env(home, host, port, public_url, database)
    cmd = [sys.executable, "-m", "stamp_flows.server_process", "--host", host, "--port", str(port)]
    cmd += ["--idle-timeout", f"{idle_timeout:g}"]
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    info = {
        "api_url": api_url,
        "ui_url": f"http://{host}:{port}",
        "pid": proc.pid,
        "started": process_start_ticks(proc.pid),
        "idle_timeout_s": idle_timeout,
        "host": socket.gethostname(),
    }
    atomic_write_text(server_file(home), json.dumps(info), mode=0o600)
    return SpawnedServer(proc, proc.pid, api_url, log)


def wait_healthy(server: SpawnedServer, timeout: float = 180.0) -> None:
    """Return once ``server`` answers its health check; raise naming its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = server.proc.poll() is not None if server.proc else not pid_alive(server.pid)
        if exited:
            raise RuntimeError(f"the local Prefect server (pid {server.pid}) exited; see {server.log}")
        if server_is_healthy(server.api_url, timeout=1.0):
            return
        time.sleep(0.1)
    raise TimeoutError(
        f"the local Prefect server did not answer {server.api_url}/health within {timeout:.0f} s; "
        f"see {server.log} (stop it with `stamp server --stop`)"
    )


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    public_url: str | None = None,
    database: str | None = None,
    idle_timeout: float = 0.0,
    timeout: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server process, wait until it answers; return it and its API URL."""
    server = spawn_server(
        home, host=host, port=port, public_url=public_url, database=database, idle_timeout=idle_timeout
    )
    assert server.proc is not None
    try:
        wait_healthy(server, timeout)
    except (RuntimeError, TimeoutError):
        server.proc.terminate()
        server_file(home).unlink(missing_ok=True)
        raise
    return server.proc, server.api_url


def _lock(path: Path, mode: int, timeout: float, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"{path}: {what} did not finish within {timeout:.0f} s; run `stamp server --stop`"
                ) from None
            time.sleep(0.05)


_USERS_FDS: dict[str, int] = {}


def hold_users_lock(home: Path, timeout: float = 60.0) -> None:
    """Hold ``home``'s users lock (shared) until this process exits: its server does not idle-stop meanwhile.

    Blocks while a server is stopping for idleness (it holds the lock exclusively until it exits).
    """
    key = str(home)
    if key not in _USERS_FDS:
        what = "the idle local Prefect server's shutdown"
        _USERS_FDS[key] = _lock(home / USERS_LOCK, fcntl.LOCK_SH, timeout, what)


def find_or_start_server(home: Path, idle_timeout: float) -> SpawnedServer | None:
    """The live server recorded under ``home``, or a new one spawned in the background (not awaited).

    Holds the users lock for the rest of this process. One process at a time decides (the start lock),
    so commands starting together start one server; a stale record (its process died or its PID was
    reused) is replaced. None when the record is another machine's (a ``PREFECT_HOME`` shared over the
    network): that server is left alone.
    """
    make_private_dir(home)
    hold_users_lock(home)
    fd = _lock(home / START_LOCK, fcntl.LOCK_EX, 120.0, "another command starting the local Prefect server")
    try:
        info = recorded_server(home)
        if info is not None and recorded_elsewhere(info):
            return None
        if info is not None and record_is_live(info):
            return SpawnedServer(None, int(info["pid"]), str(info["api_url"]), home / LOG_FILE)
        return spawn_server(home, idle_timeout=idle_timeout)
    finally:
        os.close(fd)


def stop_server(home: Path, timeout: float = 20.0) -> bool:
    """Stop the server recorded under ``home`` (its process group); True if one was stopped."""
    info = recorded_server(home)
    if info is not None and recorded_elsewhere(info):
        return False  # another machine's server: stop it there
    server_file(home).unlink(missing_ok=True)
    if info is None or not record_is_live(info):
        return False
    pid = int(info["pid"])
    stopped = False
    try:
        os.killpg(pid, signal.SIGTERM)
        stopped = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return stopped


def serve_foreground(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    public_url: str | None = None,
    database: str | None = None,
) -> int:
    """Run the server until Ctrl-C, then stop it and remove the record."""
    proc, api_url = start_server(home, host=host, port=port, public_url=public_url, database=database)
    print(
        f"Prefect UI: {public_url or api_url.removesuffix('/api')}  (API {api_url}); stamp commands now use it. "
        f"It requires the auth string in {auth_file(home)}. Ctrl-C stops it."
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(home)
