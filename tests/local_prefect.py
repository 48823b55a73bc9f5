"""Helpers for the slow tests that talk to a real local Prefect server and worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from tests.conftest import REPO_ROOT


def server_auth(home: Path) -> str:
    """The auth string of the server ``stamp_flows.server.start_server`` runs under ``home``."""
    from stamp_flows.server import auth_file

    return auth_file(home).read_text().strip()


def worker_env(tmp_path: Path, home: Path, api: str) -> dict[str, str]:
    """Environment for worker / CLI subprocesses of a test: this server, isolated stores, this venv first.

    ``prefect worker start`` reads no stamp files, so the server's auth string goes in the environment,
    as IT sets it for a worker service.
    """
    auth = {"PREFECT_API_AUTH_STRING": server_auth(home)} if (home / "stamp-server-auth").exists() else {}
    return {
        **os.environ,
        **auth,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "STAMP_CACHE_DIR": str(tmp_path / "stamp-cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def deploy_from_repo(entrypoint: str, name: str, pool: str, **kwargs: Any) -> UUID:
    """Register the flow at ``entrypoint`` (relative to the repo root) as deployment ``name`` on ``pool``."""
    from prefect import Flow, flow

    # sync calls of Prefect's sync-or-async API (typed as a union with the coroutine)
    source = cast(Flow, flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoint))
    return cast(UUID, source.deploy(name=name, work_pool_name=pool, print_next_steps=False, **kwargs))


def server_post(api: str, home: Path, path: str, body: dict[str, Any]) -> Any:
    """POST ``body`` to ``api + path`` as a client of the server under ``home`` (auth string + CSRF token)."""
    import base64

    import httpx

    basic = base64.b64encode(server_auth(home).encode()).decode()
    headers = {"Authorization": f"Basic {basic}"}
    token = httpx.get(f"{api}/csrf-token", params={"client": "tests"}, headers=headers, timeout=30)
    token.raise_for_status()
    headers.update({"Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": "tests"})
    resp = httpx.post(f"{api}{path}", json=body, headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()
