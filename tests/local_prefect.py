"""Helpers for the slow tests that talk to a real local Prefect server and worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from tests.conftest import REPO_ROOT


def worker_env(tmp_path: Path, home: Path, api: str) -> dict[str, str]:
    """Environment for worker / CLI subprocesses of a test: this server, isolated stores, this venv first."""
    return {
        **os.environ,
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
