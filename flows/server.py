"""``stamp server``: a local Prefect server + UI that later ``stamp`` commands reuse.

The server runs ``prefect server start`` on 127.0.0.1 with the same ``PREFECT_HOME`` as
the commands, so runs made earlier against the embedded API show up in its UI too. Its
URL and PID are written to ``$PREFECT_HOME/stamp-server.json``; :mod:`stamp_flows.runtime`
reads that file and points each command at the running server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stamp.fileio import atomic_write_text
from stamp_flows.runtime import server_file, server_is_healthy


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


def start_server(
    home: Path, *, host: str = "127.0.0.1", port: int | None = None, timeout: float = 180.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a Prefect server process in its own session; return it and its API URL once healthy."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    log = home / "stamp-server.log"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    # the UI asks /ui-settings where the API is: without these it answers port 4200
    env.update(PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=api_url)
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as fh:
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
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
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


def serve_foreground(home: Path, *, host: str = "127.0.0.1", port: int | None = None) -> int:
    """Run the server until Ctrl-C, then stop it and remove the record."""
    proc, api_url = start_server(home, host=host, port=port)
    print(
        f"Prefect UI: {api_url.removesuffix('/api')}  (API {api_url}); stamp commands now use it. Ctrl-C stops it."
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(home)
