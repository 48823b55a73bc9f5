"""Where Prefect runs go, decided before ``import prefect`` (only environment variables).

Order of precedence:

1. ``PREFECT_API_URL`` in the environment — runs go to that server as Prefect users expect.
2. ``orchestration.prefect_api_url`` in the config.
3. A local server started by ``stamp server`` and recorded in ``$PREFECT_HOME/stamp-server.json``
   that answers its health check — reused, so a command costs ~1–2 s of Prefect
   overhead instead of starting a temporary server.
4. Otherwise Prefect's embedded API: a temporary server on SQLite under
   ``PREFECT_HOME`` (default ``~/.stamp/prefect``), with the start-up timeout raised to
   120 s because a fresh database takes 15–30 s to migrate on a small machine.

Prefect's own logs are quiet (WARNING) unless the command runs with ``-v``; telemetry is off.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stamp.fileio import make_private_dir, pid_alive

SERVER_FILE = "stamp-server.json"


@dataclass(frozen=True)
class PrefectTarget:
    """Which Prefect API a command talks to: mode is 'configured', 'local-server' or 'embedded'."""

    mode: str
    api_url: str | None
    home: Path

    def describe(self) -> str:
        """One line for the log."""
        if self.mode == "embedded":
            return f"Prefect: embedded local API (PREFECT_HOME={self.home})"
        return f"Prefect: {self.mode} API at {self.api_url}"


def default_prefect_home() -> Path:
    """``$STAMP_HOME/prefect``, with ``STAMP_HOME`` defaulting to ``~/.stamp``."""
    return Path(os.environ.get("STAMP_HOME", Path.home() / ".stamp")) / "prefect"


def server_file(home: Path) -> Path:
    """The file where ``stamp server`` records its URL and PID."""
    return home / SERVER_FILE


def server_is_healthy(api_url: str, timeout: float = 1.0) -> bool:
    """True when ``<api_url>/health`` answers ``true`` within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def running_local_server(home: Path) -> str | None:
    """API URL of a healthy server recorded by ``stamp server`` under ``home``, else None."""
    path = server_file(home)
    try:
        info = json.loads(path.read_text())
        url, pid = str(info["api_url"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid_alive(pid) and server_is_healthy(url):
        return url
    return None


def configure_prefect(
    *,
    api_url: str | None = None,
    prefect_home: Path | None = None,
    result_dir: Path | None = None,
    verbosity: int = 0,
) -> PrefectTarget:
    """Set the Prefect environment for this process; call before importing prefect.

    Values already present in the environment win over the arguments, so a user's
    ``PREFECT_*`` variables keep their usual meaning.

    ``PREFECT_HOME`` (database, logs, artifacts) and the result folder are created with mode
    0700 when they do not exist yet (security review M6/M12); existing folders keep their mode.
    """

    env = os.environ
    home = Path(env.get("PREFECT_HOME") or prefect_home or default_prefect_home()).expanduser()
    env.setdefault("PREFECT_HOME", str(home))
    home = Path(env["PREFECT_HOME"])
    make_private_dir(home)  # Prefect creates only the last path component, with the umask's mode
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    level = {0: "WARNING", 1: "INFO"}.get(verbosity, "DEBUG")
    env.setdefault("PREFECT_LOGGING_LEVEL", level)
    env.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING" if verbosity < 2 else "INFO")
    if result_dir is not None:
        env.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(result_dir).expanduser()))
        make_private_dir(Path(env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]).expanduser())

    if env.get("PREFECT_API_URL"):
        return PrefectTarget("configured", env["PREFECT_API_URL"], home)
    if api_url:
        env["PREFECT_API_URL"] = api_url
        return PrefectTarget("configured", api_url, home)
    local = running_local_server(home)
    if local:
        env["PREFECT_API_URL"] = local
        return PrefectTarget("local-server", local, home)
    return PrefectTarget("embedded", None, home)
