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

The Prefect server that ``stamp server`` starts requires an auth string (security review H1). It lives
in ``$PREFECT_HOME/stamp-server-auth`` (0600 in the 0700 ``PREFECT_HOME``); a command sends it only to
that server's own URL (never to a URL a config names) unless ``PREFECT_API_AUTH_STRING`` is set, which
wins, as in Prefect. A URL from a config must be ``https://`` or a loopback ``http://`` one: flow
parameters, logs and artifacts (thumbnails) go there (L9).

Prefect's own logs are quiet (WARNING) unless the command runs with ``-v``; telemetry is off.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stamp.fileio import make_private_dir, pid_alive

SERVER_FILE = "stamp-server.json"
AUTH_FILE = "stamp-server-auth"


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


def auth_file(home: Path) -> Path:
    """The 0600 file holding the auth string of the server that ``stamp server`` runs under ``home``."""
    return home / AUTH_FILE


def private_file_text(path: Path) -> str | None:
    """The text of ``path`` if it is a regular file of ours that no one else can read or write, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        return fh.read().strip() or None


def is_loopback_url(url: str) -> bool:
    """True for an ``http(s)`` URL whose host is ``localhost`` or a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(url: str, where: str) -> str:
    """``url`` if it is ``https://`` or loopback ``http://``; else a ConfigError naming ``where``."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and is_loopback_url(url)):
        return url
    from stamp.config import ConfigError

    raise ConfigError(
        f"{where} = {url!r}: flow parameters, logs and artifacts would cross the network in clear text; "
        "use https:// (a TLS proxy in front of the server, README 'Deploying for a hospital') or a loopback URL"
    )


def server_is_healthy(api_url: str, timeout: float = 1.0) -> bool:
    """True when ``<api_url>/health`` answers ``true`` within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200 and resp.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def recorded_server(home: Path) -> dict[str, str | int] | None:
    """What ``stamp server`` recorded under ``home`` (api_url, ui_url, pid), if the record is ours alone."""
    text = private_file_text(server_file(home))
    if text is None:
        return None
    try:
        info = json.loads(text)
        return {"api_url": str(info["api_url"]), "ui_url": str(info["ui_url"]), "pid": int(info["pid"])}
    except (ValueError, KeyError, TypeError):
        return None


def running_local_server(home: Path) -> str | None:
    """API URL of a healthy server recorded by ``stamp server`` under ``home``, else None.

    A record that others could have written (not ours, or group/other-writable) is not trusted (L9).
    """
    info = recorded_server(home)
    if info is None:
        return None
    url = str(info["api_url"])
    if pid_alive(int(info["pid"])) and server_is_healthy(url):
        return url
    return None


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
        _send_auth_to(home, env["PREFECT_API_URL"])
        return PrefectTarget("configured", env["PREFECT_API_URL"], home)
    if api_url:
        env["PREFECT_API_URL"] = check_api_url(api_url, "orchestration.prefect_api_url")
        _send_auth_to(home, api_url)
        return PrefectTarget("configured", api_url, home)
    local = running_local_server(home)
    if local:
        env["PREFECT_API_URL"] = local
        _send_auth_to(home, local)
        return PrefectTarget("local-server", local, home)
    return PrefectTarget("embedded", None, home)
