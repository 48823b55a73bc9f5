"""``stamp server``: a local Prefect server + UI that later ``stamp`` commands reuse.

The server runs ``prefect server start`` on 127.0.0.1 with the same ``PREFECT_HOME`` as
the commands, so runs made earlier against the embedded API show up in its UI too. Its
URL and PID are written to ``$PREFECT_HOME/stamp-server.json``; :mod:`stamp_flows.runtime`
reads that file and points each command at the running server.

Secure by default (security review H1): the server always requires an auth string — the one IT sets in
``PREFECT_SERVER_API_AUTH_STRING``, else one generated on first start into
``$PREFECT_HOME/stamp-server-auth`` (0600) that ``stamp`` commands send to this server only — with
CSRF protection on and CORS limited to the UI's own origin, so neither another local user nor a web
page open in a browser on the machine can start runs. The server has no TLS of its own: for a
routable ``host``, put a TLS proxy in front and give its URL as ``public_url``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from stamp.fileio import atomic_write_text, make_private_dir
from stamp_flows.runtime import (
    auth_file,
    check_api_url,
    is_loopback_url,
    private_file_text,
    recorded_server,
    server_file,
    server_is_healthy,
)

AUTH_USER = "stamp"


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


def _server_cmd(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def _wait_healthy(proc: subprocess.Popen[bytes], api_url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with status {proc.returncode}; see {log}")
        if server_is_healthy(api_url, timeout=1.0):
            return
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError(f"Prefect server did not answer {api_url}/health within {timeout:.0f} s; see {log}")


DATABASE_SCHEMES = ("postgresql+asyncpg", "sqlite+aiosqlite")


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


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    public_url: str | None = None,
    database: str | None = None,
    timeout: float = 180.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Prefect server process in its own session; return it and its API URL once healthy.

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
    log = home / "stamp-server.log"
    env = server_env(home, host, port, public_url, database)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "ab") as fh:
        proc = subprocess.Popen(
            _server_cmd(host, port), env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_healthy(proc, api_url, timeout, log)
    info = {"api_url": api_url, "ui_url": f"http://{host}:{port}", "pid": proc.pid}
    atomic_write_text(server_file(home), json.dumps(info), mode=0o600)
    return proc, api_url


def stop_server(home: Path, timeout: float = 20.0) -> bool:
    """Stop the server recorded under ``home`` (by PID); True if one was stopped."""
    path = server_file(home)
    info = recorded_server(home)
    if info is None or int(info["pid"]) <= 1:
        return False
    pid = int(info["pid"])
    stopped = False
    try:
        os.killpg(pid, signal.SIGTERM)
        stopped = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.killpg(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    path.unlink(missing_ok=True)
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
