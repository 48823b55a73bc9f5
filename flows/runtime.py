"""Where Prefect runs go, decided before ``import prefect`` (only environment variables).

Order of precedence:

1. ``PREFECT_API_URL`` in the environment — runs go to that server as Prefect users expect.
2. ``orchestration.prefect_api_url`` in the config.
3. The local server recorded in ``$PREFECT_HOME/stamp-server.json`` (started by ``stamp server`` or by
   an earlier command), or, when there is none, a new one started in the background that stays up until
   idle for ``STAMP_SERVER_IDLE_MINUTES`` (default 30): see :mod:`stamp_flows.server`. The command does not
   wait for it here; :meth:`PrefectTarget.wait_ready` does, just before the first flow runs, so the
   server's start overlaps the command's own imports and checks.
4. ``STAMP_SERVER_AUTOSTART=0``: Prefect's embedded API instead (a temporary server on SQLite under
   ``PREFECT_HOME`` for this command only), as before.

When Prefect is already imported (a test harness, a notebook), its current settings stand: nothing is
started.

The local server requires an auth string (security review H1). It lives in
``$PREFECT_HOME/stamp-server-auth`` (0600 in the 0700 ``PREFECT_HOME``); a command sends it only to
that server's own URL (never to a URL a config names) unless ``PREFECT_API_AUTH_STRING`` is set, which
wins, as in Prefect. A URL from a config must be ``https://`` or a loopback ``http://`` one (L9).

Prefect's own logs are quiet (WARNING) unless the command runs with ``-v``; telemetry is off.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from stamp.fileio import make_private_dir, private_file_text
from stamp_flows.api_urls import check_api_url
from stamp_flows.server import (
    SpawnedServer,
    auth_file,
    find_or_start_server,
    idle_timeout_s,
    recorded_server,
    running_local_server,
    wait_healthy,
)


@dataclass
class PrefectTarget:
    """Which Prefect API a command talks to: mode is 'configured', 'local-server', 'embedded' or
    'in-process'; ``server`` is the local server when this command may have to wait for it."""

    mode: str
    api_url: str | None
    home: Path
    server: SpawnedServer | None = field(default=None, repr=False)
    waited_s: float = 0.0

    def describe(self) -> str:
        """One line for the log."""
        if self.mode == "embedded":
            return f"Prefect: embedded local API (PREFECT_HOME={self.home})"
        if self.mode == "in-process":
            return "Prefect: the settings of this process"
        return f"Prefect: {self.mode} API at {self.api_url}"

    def wait_ready(self) -> None:
        """Block until the local server answers (no-op for other targets or once it did)."""
        if self.server is None:
            return
        t0 = time.perf_counter()
        try:
            wait_healthy(self.server)
        finally:
            self.waited_s += time.perf_counter() - t0
        self.server = None


def default_prefect_home() -> Path:
    """``$STAMP_HOME/prefect``, with ``STAMP_HOME`` defaulting to ``~/.stamp``."""
    return Path(os.environ.get("STAMP_HOME", Path.home() / ".stamp")) / "prefect"


def _send_auth_to(home: Path, api_url: str) -> None:
    """Put the local server's auth string in the environment when ``api_url`` is that server."""
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return
    info = recorded_server(home)
    if info is None or str(info["api_url"]).rstrip("/") != api_url.rstrip("/"):
        return  # another server: never send it our credential
    secret = private_file_text(auth_file(home))
    if secret:
        os.environ["PREFECT_API_AUTH_STRING"] = secret


def configure_prefect(
    *,
    api_url: str | None = None,
    prefect_home: Path | None = None,
    result_dir: Path | None = None,
    verbosity: int = 0,
    start_server: bool = True,
) -> PrefectTarget:
    """Set the Prefect environment for this process; call before importing prefect.

    Values already present in the environment win over the arguments, so a user's
    ``PREFECT_*`` variables keep their usual meaning.

    ``PREFECT_HOME`` (database, logs, artifacts) and the result folder are created with mode
    0700 when they do not exist yet (security review M6/M12); existing folders keep their mode.
    ``start_server=False`` only finds a running local server (``stamp server`` itself).
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
        _send_auth_to(home, env["PREFECT_API_URL"])
        return PrefectTarget("configured", env["PREFECT_API_URL"], home)
    if api_url:
        env["PREFECT_API_URL"] = check_api_url(api_url, "orchestration.prefect_api_url")
        _send_auth_to(home, api_url)
        return PrefectTarget("configured", api_url, home)
    if "prefect.settings" in sys.modules:
        return PrefectTarget("in-process", None, home)
    if not start_server or env.get("STAMP_SERVER_AUTOSTART", "1") == "0":
        local = running_local_server(home)
        if local:
            env["PREFECT_API_URL"] = local
            _send_auth_to(home, local)
            return PrefectTarget("local-server", local, home)
        return PrefectTarget("embedded", None, home)
    server = find_or_start_server(home, idle_timeout_s())
    if server is None:
        from stamp.logs import logger

        logger.warning(
            "%s names a Prefect server on another machine; this command uses a temporary API "
            "(set PREFECT_API_URL to share one server between machines)",
            home / "stamp-server.json",
        )
        return PrefectTarget("embedded", None, home)
    env["PREFECT_API_URL"] = server.api_url
    _send_auth_to(home, server.api_url)
    return PrefectTarget("local-server", server.api_url, home, server=server)


def flush_prefect() -> None:
    """Send Prefect's queued logs and events now (Prefect does it at exit), so the command can time it."""
    if "prefect.events.worker" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
