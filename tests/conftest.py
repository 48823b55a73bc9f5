"""Shared fixtures. The environment is isolated before anything imports Prefect."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="stamp-tests-"))
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
# Keep tests away from the user's ~/.stamp, ~/.cache/stamp and any configured server.
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ["STAMP_HOME"] = str(_SESSION_TMP / "stamp-home")
os.environ["STAMP_CACHE_DIR"] = str(_SESSION_TMP / "stamp-cache")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MPLBACKEND", "Agg")
# a `stamp` subprocess without PREFECT_API_URL starts the local server under the session's PREFECT_HOME
# (issue #17); it is stopped when the session ends, and one left by a killed session exits soon
os.environ.setdefault("STAMP_SERVER_IDLE_MINUTES", "5")

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the local Prefect server that `stamp` subprocesses of this session started."""
    from stamp_flows.server import stop_server

    stop_server(Path(os.environ["PREFECT_HOME"]))


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A session-wide Prefect test server (fresh SQLite) with its own result store.

    Yields the API URL, so subprocesses can be pointed at the same server. Pays the
    server start (~20–30 s here) once per session; only engine tests use it.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with (
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}),
        prefect_test_harness(server_startup_timeout=180),
    ):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh digest index / lock dir for one test (via ``STAMP_CACHE_DIR``)."""
    cache = tmp_path / "stamp-cache"
    monkeypatch.setenv("STAMP_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models on 2 shared cores: one intra-op thread is ~10x faster than spinning two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def stamp_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on the ``stamp`` logger itself (it does not propagate once the CLI set up logging)."""
    logger = logging.getLogger("stamp")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # records once, whether or not the CLI set up logging before
    caplog.handler.setLevel(logging.DEBUG)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


def leftover_temps(root: Path) -> list[Path]:
    """Temp files/folders of ours (``stamp.fileio`` names) anywhere under ``root``."""
    return [p for p in Path(root).rglob("*") if ".stamp-tmp-" in p.name or ".stamp-old-" in p.name]
