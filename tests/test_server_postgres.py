"""``stamp server`` on PostgreSQL: deployments/postgres/postgres-up.sh, a real cohort run, and a load test.

Slow tier, root only: postgres-up.sh installs Debian's PostgreSQL if missing and starts a throw-away
instance (temp state dir under /var/tmp, a free 127.0.0.1 port), deleted afterwards. The server gets the
printed ``postgresql+asyncpg://`` URL (no password in it) and reads the password through ``PGPASSFILE``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.local_prefect import server_post, worker_env


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_server_load", REPO_ROOT / "bench" / "bench_server_load.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: postgres-up.sh installs PostgreSQL (apt) and runs it as the postgres user"
    have_pg = any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not have_pg and shutil.which("apt-get") is None:
        return "PostgreSQL is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    pg = bench.Postgres()
    try:
        pg.up()
        yield pg
    finally:
        pg.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_postgres_up_is_private_idempotent_and_loopback_only(postgres: Any) -> None:
    state = postgres.state
    url = postgres.url
    assert url == f"postgresql+asyncpg://prefect@127.0.0.1:{postgres.port}/prefect"  # no password in it
    st = state.stat()
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o710  # root's; the postgres group may only traverse
    for name in ("password", "pgpass", "url"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    password = (state / "password").read_text().strip()
    assert (state / "pgpass").read_text() == f"127.0.0.1:{postgres.port}:*:prefect:{password}\n"
    # again: same URL, same password, nothing restarted
    pid = (state / "data" / "postmaster.pid").read_text().split()[0]
    assert postgres.up() == url
    assert (state / "password").read_text().strip() == password
    assert (state / "data" / "postmaster.pid").read_text().split()[0] == pid
    assert postgres.psql("SHOW listen_addresses") == "127.0.0.1\n"
    assert postgres.psql("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'") == "pg_trgm\n"
    assert int(postgres.psql("SHOW server_version_num")) >= 140009  # Prefect's minimum
    # a state dir others could write is refused
    bad = Path(postgres.state.parent / f"{postgres.state.name}-bad")
    bad.mkdir(mode=0o777)
    try:
        os.chmod(bad, 0o777)
        env = {**os.environ, "STAMP_POSTGRES_STATE": str(bad), "STAMP_POSTGRES_PORT": str(postgres.port)}
        proc = subprocess.run(
            ["bash", str(bench.POSTGRES_UP)], env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and "writable by group or others" in proc.stderr
    finally:
        bad.rmdir()


def _stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_server_on_postgresql_runs_a_cohort_to_completion(
    postgres: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stamp_flows.server import start_server, stop_server

    monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))
    home = tmp_path / "prefect-home"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    server, api = start_server(home, database=postgres.url)
    times["server start (migrations on PostgreSQL)"] = time.monotonic() - t0
    env = worker_env(tmp_path, home, api)
    worker = None
    try:
        t0 = time.monotonic()
        code = "from stamp_flows.deployments import register_deployments; print(register_deployments(pools=['stamp-process']))"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "cohort/process" in out.stdout
        times["deploy-flows"] = time.monotonic() - t0
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as fh:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    "stamp-process",
                    "--limit",
                    "1",
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        cohort = tmp_path / "cohort"
        bench.write_template_cohort(cohort)
        config = bench.write_config(cohort, relative=False)

        (deployment,) = server_post(
            api,
            home,
            "/deployments/filter",
            {"deployments": {"name": {"any_": ["process"]}}, "flows": {"name": {"any_": ["cohort"]}}},
        )
        t0 = time.monotonic()
        run = server_post(
            api,
            home,
            f"/deployments/{deployment['id']}/create_flow_run",
            {"parameters": {"config_path": str(config)}},
        )
        deadline = time.monotonic() + 300
        while True:
            runs = server_post(api, home, "/flow_runs/filter", {"flows": {"name": {"any_": ["cohort"]}}})
            if all(r["state_type"] in bench.FINAL for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(2)
        times["cohort run"] = time.monotonic() - t0
        log = worker_log.read_text(errors="replace")[-3000:]
        # listed once, by the id we created, completed, with the parameters we gave
        assert [r["id"] for r in runs] == [run["id"]], runs
        assert runs[0]["state_type"] == "COMPLETED", log
        assert runs[0]["parameters"] == {"config_path": str(config)}
        assert runs[0]["deployment_id"] == deployment["id"]
        # the run's outputs: one feature file per slide
        h5 = sorted(p.name for p in (cohort / "features").rglob("*.h5"))
        assert h5 == ["slide-0.h5", "slide-1.h5"]
        # the server really is on PostgreSQL: the run is a row of Prefect's flow_run table there
        row = postgres.psql(f"SELECT state_type FROM flow_run WHERE id = '{run['id']}'")
        assert row == "COMPLETED\n"
        # and every run the API lists (the cohort run and its preprocess subflow) is there, nothing else
        listed = {r["id"] for r in server_post(api, home, "/flow_runs/filter", {})}
        assert len(listed) == 2
        assert set(postgres.psql("SELECT id FROM flow_run").split()) == listed
        assert not (home / "prefect.db").exists()  # no SQLite database next to it
        server_log = (home / "stamp-server.log").read_text(errors="replace")
        assert "database is locked" not in server_log
        assert "Traceback" not in server_log, server_log[-3000:]
    finally:
        _stop_group(worker)
        stop_server(home)
        server.wait(timeout=60)
        print("\npostgres e2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_load_on_postgresql_no_locks_no_lost_or_duplicated_runs(postgres: Any, tmp_path: Path) -> None:
    """3 concurrent cohort runs + 1 started by the watcher, on a fresh PostgreSQL database of the instance."""
    runs = 3
    postgres.psql("CREATE DATABASE prefect_load OWNER prefect")
    try:
        url = postgres.url.rsplit("/", 1)[0] + "/prefect_load"
        out = tmp_path / "load.json"
        cmd = [sys.executable, str(REPO_ROOT / "bench" / "bench_server_load.py"), "--backend", "postgres"]
        cmd += ["--runs", str(runs), "--database", url, "--work", str(tmp_path / "work"), "--json", str(out)]
        cmd += ["--timeout", "400"]
        env = {**os.environ, "PGPASSFILE": str(postgres.passfile)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=800, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        print("\n" + "\n".join(proc.stdout.strip().splitlines()[-3:]))
        (row,) = json.loads(out.read_text())
        assert row["runs"] == runs + 1
        assert row["locked"] == 0 and row["create_retries"] == 0
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["unexpected"] == 0
        assert row["failed"] == 0 and row["completed"] == runs + 1
        assert row["watcher_runs"] == 1 and row["created_ids_listed"] == runs
        assert row["features_ok"] == runs + 1
        assert row["runs_per_min"] > 0
        n = int(
            postgres.psql(
                "SELECT count(*) FROM flow_run f JOIN flow ON flow.id = f.flow_id WHERE flow.name = 'cohort'",
                db="prefect_load",
            )
        )
        assert n == runs + 1
    finally:
        postgres.psql("DROP DATABASE IF EXISTS prefect_load WITH (FORCE)")
