"""H1, L9: the Prefect server `stamp server` starts is not open to every local user or web page.

Attacks from the security review, each tried against a real server started the way `stamp server`
starts it: a client without the auth string, a browser page on another origin (CORS), a request that
carries the credential but no CSRF token (what a forged cross-site request looks like), a config that
redirects runs to a plain-HTTP server, and planted credential / server records.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stamp.config import ConfigError
from stamp_flows.api_urls import check_api_url
from stamp_flows.runtime import configure_prefect
from stamp_flows.server import AUTH_FILE, SERVER_FILE, server_auth_string, start_server, stop_server

EVIL_ORIGIN = "http://evil.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    home = tmp_path_factory.mktemp("secure") / "prefect-home"
    proc, api = start_server(home)
    try:
        yield home, api
    finally:
        stop_server(home)
        proc.wait(timeout=30)


def _basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def test_auth_string_is_generated_private(server: tuple[Path, str]) -> None:
    home, _ = server
    secret_file = home / AUTH_FILE
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    user, _, secret = secret_file.read_text().strip().partition(":")
    assert user == "stamp" and len(secret) >= 40
    assert (home / "stamp-server.log").stat().st_mode & 0o077 == 0


def test_api_refuses_a_client_without_the_auth_string(server: tuple[Path, str]) -> None:
    home, api = server
    assert httpx.get(f"{api}/health").status_code == 200  # health stays open for probes
    assert httpx.get(f"{api}/admin/version").status_code == 401
    assert httpx.get(f"{api}/admin/version", headers=_basic("stamp:guess")).status_code == 401
    assert httpx.get(f"{api}/csrf-token", params={"client": "t"}).status_code == 401
    secret = (home / AUTH_FILE).read_text().strip()
    token = httpx.get(f"{api}/csrf-token", params={"client": "t"}, headers=_basic(secret))
    assert token.status_code == 200
    csrf = {"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": "t"}
    # even with a valid CSRF token, nothing can be read or started without the credential:
    # a run with hostile job variables cannot even be asked for
    assert httpx.post(f"{api}/deployments/filter", json={}, headers=csrf).status_code == 401
    create = httpx.post(
        f"{api}/deployments/00000000-0000-0000-0000-000000000000/create_flow_run",
        json={"job_variables": {"privileged": True, "volumes": ["/:/host"]}},
        headers=csrf,
    )
    assert create.status_code == 401
    assert (
        httpx.post(f"{api}/deployments/filter", json={}, headers={**csrf, **_basic(secret)}).status_code
        == 200
    )


def test_a_forged_cross_site_request_is_refused(server: tuple[Path, str]) -> None:
    """CSRF: a browser that holds the credential still cannot be made to change state from a page."""
    home, api = server
    secret = (home / AUTH_FILE).read_text().strip()
    forged = httpx.post(
        f"{api}/flow_runs/", json={"flow_id": "00000000-0000-0000-0000-000000000000"}, headers=_basic(secret)
    )
    assert forged.status_code == 403
    assert "csrf" in forged.text.lower()


def test_cors_allows_only_the_ui_origin(server: tuple[Path, str]) -> None:
    _, api = server
    ui_origin = api.removesuffix("/api")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    evil = httpx.options(f"{api}/flow_runs/filter", headers={"Origin": EVIL_ORIGIN, **preflight})
    assert evil.headers.get("access-control-allow-origin") not in ("*", EVIL_ORIGIN)
    ours = httpx.options(f"{api}/flow_runs/filter", headers={"Origin": ui_origin, **preflight})
    assert ours.headers.get("access-control-allow-origin") == ui_origin


def test_stamp_commands_reach_the_server_with_its_auth_string(server: tuple[Path, str]) -> None:
    """The client side reads the 0600 file: a flow run from a plain `stamp`-style process completes."""
    home, api = server
    code = (
        "from stamp_flows.runtime import configure_prefect\n"
        "t = configure_prefect()\n"
        "from prefect import flow\n"
        "@flow(name='auth-probe')\n"
        "def probe():\n"
        "    return 41 + 1\n"
        "print(t.mode, t.api_url, probe())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["local-server", api, "42"]


def test_auth_string_is_never_sent_to_another_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / SERVER_FILE).write_text(
        json.dumps({"api_url": "http://127.0.0.1:4200/api", "ui_url": "http://127.0.0.1:4200", "pid": 1})
    )
    (home / SERVER_FILE).chmod(0o600)
    server_auth_string(home)
    for key in ("PREFECT_API_AUTH_STRING", "PREFECT_API_URL"):
        monkeypatch.setenv(key, "")  # so that monkeypatch restores what configure_prefect sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    configure_prefect()
    assert "PREFECT_API_AUTH_STRING" not in os.environ
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    configure_prefect()
    assert os.environ["PREFECT_API_AUTH_STRING"] == (home / AUTH_FILE).read_text().strip()


def test_planted_credential_or_server_record_is_not_trusted(tmp_path: Path) -> None:
    from stamp_flows.server import recorded_server

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    planted = home / AUTH_FILE
    planted.write_text("stamp:known-to-the-attacker\n")
    planted.chmod(0o644)
    with pytest.raises(PermissionError, match="mode 0600"):
        server_auth_string(home)
    planted.unlink()
    planted.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").write_text("stamp:known\n")
    (tmp_path / "elsewhere").chmod(0o600)
    with pytest.raises(PermissionError, match=str(planted)):
        server_auth_string(home)
    record = home / SERVER_FILE
    record.write_text(json.dumps({"api_url": "http://evil:1/api", "ui_url": "http://evil:1", "pid": 1}))
    record.chmod(0o666)
    assert recorded_server(home) is None


def test_a_routable_bind_needs_a_tls_proxy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--public-url"):
        start_server(tmp_path / "home", host="0.0.0.0")
    with pytest.raises(ConfigError, match="clear text"):
        start_server(tmp_path / "home", host="0.0.0.0", public_url="http://stamp.hospital.example")
    assert not (tmp_path / "home" / SERVER_FILE).exists()


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://prefect.hospital.example/api", True),
        ("http://127.0.0.1:4200/api", True),
        ("http://localhost:4200/api", True),
        ("http://[::1]:4200/api", True),
        ("http://evil.example:4200/api", False),
        ("http://10.0.0.5:4200/api", False),
        ("ftp://127.0.0.1/api", False),
    ],
)
def test_config_may_not_send_runs_to_a_plain_http_server(url: str, ok: bool) -> None:
    """L9: parameters, logs and artifacts (thumbnails) would cross the network in clear text."""
    if ok:
        assert check_api_url(url, "orchestration.prefect_api_url") == url
    else:
        with pytest.raises(ConfigError, match="orchestration.prefect_api_url"):
            check_api_url(url, "orchestration.prefect_api_url")
