"""Server load: N concurrent ``cohort`` runs of the synthetic cohort plus a watcher, on SQLite and PostgreSQL.

For each backend: a fresh ``stamp server`` (``start_server``; PostgreSQL: a throw-away instance made by
``deployments/postgres/postgres-up.sh`` in a temp state dir on a free 127.0.0.1 port, deleted afterwards,
unless ``--database URL`` names one), ``register_deployments(pools=['stamp-process'])``, one process worker with
room for every run, ``stamp watch INBOX --interval 2`` in its own process. Then N ``cohort/process`` runs
(one per copy of a small synthetic cohort: 2 tiny slides, preprocess with the ``demo`` extractor) are
created at once from N threads, and while they run a further copy is dropped into the INBOX (``READY``
written last), so the watcher's event starts run N+1. Everything is local (127.0.0.1) and bounded
(``--timeout`` for the runs, timeouts on every subprocess).

Reported per backend: runs expected (N + 1), wall seconds from the first create to the last final state,
completed runs per minute, 'database is locked' lines in the server, worker and watcher logs, lost runs
(expected but never created, or created but not in a final state by the timeout), duplicated runs (more
than one run for a cohort), and failed runs (final but not COMPLETED).

    sudo .venv/bin/python bench/bench_server_load.py --backend both --runs 8   # PostgreSQL needs root
    .venv/bin/python bench/bench_server_load.py --backend sqlite --runs 8 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_UP = REPO_ROOT / "deployments" / "postgres" / "postgres-up.sh"
POSTGRES_DOWN = REPO_ROOT / "deployments" / "postgres" / "postgres-down.sh"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LOCKED = "database is locked"
WATCHED = "<the INBOX cohort, via stamp watch>"


# ----------------------------------------------------------------------------------------- PostgreSQL


class Postgres:
    """A throw-away PostgreSQL instance from postgres-up.sh: temp state dir, free port, purged on close."""

    def __init__(self, root: Path | None = None) -> None:
        from stamp_flows.server import free_port

        self.state = Path(tempfile.mkdtemp(prefix="stamp-pg-", dir=root or "/var/tmp"))
        self.port = free_port()
        self.env = {
            **os.environ,
            "STAMP_POSTGRES_STATE": str(self.state),
            "STAMP_POSTGRES_PORT": str(self.port),
        }
        self.url = ""

    @property
    def passfile(self) -> Path:
        """The pgpass file asyncpg reads the role's password from (PGPASSFILE)."""
        return self.state / "pgpass"

    def up(self, timeout: float = 600) -> str:
        """Install (if missing) and start it; return the ``postgresql+asyncpg://`` URL it printed."""
        proc = subprocess.run(
            ["bash", str(POSTGRES_UP)], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"postgres-up.sh failed ({proc.returncode}): {proc.stderr[-2000:]}")
        self.url = proc.stdout.strip().splitlines()[-1]
        return self.url

    def psql(self, sql: str, db: str = "prefect") -> str:
        """Run ``sql`` as the ``postgres`` superuser over the instance's unix socket; its unaligned output."""
        version = (self.state / "data" / "PG_VERSION").read_text().strip()
        cmd = ["runuser", "-u", "postgres", "--", f"/usr/lib/postgresql/{version}/bin/psql", "-X", "-At"]
        cmd += ["-v", "ON_ERROR_STOP=1", "-h", str(self.state / "run"), "-p", str(self.port), "-d", db]
        proc = subprocess.run([*cmd, "-c", sql], cwd="/", capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def close(self) -> None:
        """Stop it and delete its state dir."""
        subprocess.run(
            ["bash", str(POSTGRES_DOWN), "--purge"], env=self.env, capture_output=True, text=True, timeout=120
        )


# ----------------------------------------------------------------------------------------- helpers


def _auth_headers(home: Path, api: str, client: str = "bench") -> dict[str, str]:
    from stamp_flows.server import auth_file

    basic = base64.b64encode(auth_file(home).read_text().strip().encode()).decode()
    headers = {"Authorization": f"Basic {basic}"}
    token = httpx.get(f"{api}/csrf-token", params={"client": client}, headers=headers, timeout=30)
    token.raise_for_status()
    return {**headers, "Prefect-Csrf-Token": token.json()["token"], "Prefect-Csrf-Client": client}


def client_env(work: Path, home: Path, api: str) -> dict[str, str]:
    """Environment of worker / watcher / deploy subprocesses: this server, isolated stores, this venv first."""
    from stamp_flows.server import auth_file

    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_API_AUTH_STRING": auth_file(home).read_text().strip(),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "results"),
        "STAMP_CACHE_DIR": str(work / "stamp-cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def cohort_runs(api: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Every run of the ``cohort`` flow the server knows (paged)."""
    runs: list[dict[str, Any]] = []
    while True:
        body = {"flows": {"name": {"any_": ["cohort"]}}, "limit": 200, "offset": len(runs)}
        resp = httpx.post(f"{api}/flow_runs/filter", json=body, headers=headers, timeout=60)
        resp.raise_for_status()
        page = resp.json()
        runs += page
        if len(page) < 200:
            return runs


def write_template_cohort(folder: Path, slides: int = 2, size: int = 1536) -> None:
    """A small synthetic cohort: ``slides`` tiny pyramidal slides (no config yet: see :func:`write_config`)."""
    from stamp.synthetic import SlideSpec, write_slide

    for i in range(slides):
        write_slide(folder / "slides" / f"slide-{i}.svs", SlideSpec(width=size, height=size, mpp=0.5, seed=i))


def write_config(folder: Path, *, relative: bool) -> Path:
    """A preprocess-only config (``demo`` extractor) for the cohort in ``folder``.

    ``relative``: paths relative to the cohort folder, as a cohort dropped in the INBOX carries them (the
    watcher confines them: outputs go under its work root); else absolute, for runs created directly.
    """
    base = Path() if relative else folder.resolve()
    config = {
        "preprocessing": {
            "output_dir": str(base / "features"),
            "wsi_dir": str(base / "slides"),
            "extractor": "demo",
            "tile_size_um": 128.0,
            "max_workers": 1,
        },
        "orchestration": {"task_concurrency": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return (folder / "config.yaml").resolve()


def count_locked(*logs: Path) -> int:
    """Lines mentioning 'database is locked' in ``logs`` (missing files count 0)."""
    n = 0
    for log in logs:
        if log.exists():
            n += sum(LOCKED in line.lower() for line in log.read_text(errors="replace").splitlines())
    return n


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # its own session: the worker's flow-run children go too
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------- one backend


def run_backend(
    backend: str,
    runs: int,
    work: Path,
    *,
    database: str | None = None,
    timeout: float = 900.0,
    keep: bool = False,
) -> dict[str, Any]:
    """The load test on one backend; returns the figures (and the paths of its logs)."""
    from stamp_flows.server import start_server, stop_server

    work.mkdir(parents=True, exist_ok=True)
    home = work / "prefect-home"
    pg: Postgres | None = None
    # Prefect silences the server's retryable SQLite lock errors (it answers 503): log them, to count them
    os.environ["PREFECT_SERVER_LOG_RETRYABLE_ERRORS"] = "true"
    server = worker = watcher = None
    result: dict[str, Any] = {"backend": backend, "runs": runs + 1}
    try:
        if backend == "postgres" and database is None:
            pg = Postgres()
            database = pg.up()
            os.environ["PGPASSFILE"] = str(pg.passfile)  # the server process inherits it
        t0 = time.monotonic()
        server, api = start_server(home, database=database if backend == "postgres" else None)
        result["server_start_s"] = round(time.monotonic() - t0, 1)
        env = client_env(work, home, api)
        code = "from stamp_flows.deployments import register_deployments; print(register_deployments(pools=['stamp-process']))"
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0 or "cohort/process" not in out.stdout:
            raise RuntimeError(f"register_deployments failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")

        template = work / "template"
        write_template_cohort(template)
        configs = []
        for i in range(runs):
            shutil.copytree(template, work / "cohorts" / f"cohort-{i}")
            configs.append(str(write_config(work / "cohorts" / f"cohort-{i}", relative=False)))
        inbox = work / "inbox"
        inbox.mkdir()
        watched = inbox / "dropped"
        shutil.copytree(template, work / "staging")
        write_config(work / "staging", relative=True)
        watch_work = work / "watch-work"

        worker_log, watcher_log = work / "worker.log", work / "watcher.log"
        with worker_log.open("wb") as wl:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", "stamp-process"]
                + ["--limit", str(runs + 1)],
                cwd=REPO_ROOT,
                env=env,
                stdout=wl,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with watcher_log.open("wb") as wl:
            watcher = subprocess.Popen(
                [str(Path(sys.executable).parent / "stamp"), "watch", str(inbox), "--interval", "2"]
                + ["--state-dir", str(work / "watch-state"), "--work-root", str(watch_work)],
                cwd=work,
                env=env,
                stdout=wl,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        headers = _auth_headers(home, api)
        resp = httpx.get(f"{api}/deployments/name/cohort/process", headers=headers, timeout=60)
        resp.raise_for_status()
        deployment_id = resp.json()["id"]

        retries: list[int] = []

        def create(config: str) -> str:
            # one client (and CSRF token) per run, as N users would; 503/429 retried as Prefect's client does
            own = _auth_headers(home, api, f"bench-{Path(config).parent.name}")
            body = {"parameters": {"config_path": config}}
            url = f"{api}/deployments/{deployment_id}/create_flow_run"
            for attempt in range(6):
                run = httpx.post(url, json=body, headers=own, timeout=120)
                if run.status_code not in (429, 503) or attempt == 5:
                    break
                retries.append(run.status_code)
                time.sleep(2**attempt)
            run.raise_for_status()
            return str(run.json()["id"])

        t_start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=runs) as pool:
            created = list(pool.map(create, configs))
        result["create_s"] = round(time.monotonic() - t_start, 2)
        # the N runs are under way: a cohort lands in the INBOX (READY last) and the watcher picks it up
        (work / "staging").rename(watched)
        (watched / "READY").touch()
        configs.append(WATCHED)

        deadline = t_start + timeout
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            seen = cohort_runs(api, headers)
            if len(seen) >= len(configs) and all(r["state_type"] in FINAL for r in seen):
                break
            time.sleep(2)
        wall = time.monotonic() - t_start

        per_key: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
        for r in seen:  # the watcher's run gets its config snapshot (snapshot_path), not config_path
            key = WATCHED if r["parameters"].get("snapshot_path") else r["parameters"].get("config_path", "?")
            per_key.setdefault(key, []).append(r)
        lost = sum(1 for c in configs if not per_key[c]) + sum(
            1 for r in seen if r["state_type"] not in FINAL
        )
        completed = sum(r["state_type"] == "COMPLETED" for r in seen)
        outputs = [Path(c).parent / "features" for c in configs[:-1]] + [
            watch_work / watched.name / "features"
        ]
        features_ok = sum(len(list(f.rglob("*.h5"))) == 2 for f in outputs)
        result.update(
            wall_s=round(wall, 1),
            completed=completed,
            runs_per_min=round(completed / wall * 60, 2) if wall else 0.0,
            create_retries=len(retries),
            locked=count_locked(home / "stamp-server.log", worker_log, watcher_log),
            lost=lost,
            duplicated=sum(max(0, len(v) - 1) for v in per_key.values()),
            unexpected=sum(len(v) for k, v in per_key.items() if k not in configs),
            failed=sum(r["state_type"] in FINAL - {"COMPLETED"} for r in seen),
            features_ok=features_ok,
            created_ids_listed=sum(any(r["id"] == i for r in seen) for i in created),
            watcher_runs=len(per_key[configs[-1]]),
            logs={
                "server": str(home / "stamp-server.log"),
                "worker": str(worker_log),
                "watcher": str(watcher_log),
            },
        )
        if pg is not None:  # the server really wrote to PostgreSQL: its flow_run table holds the runs
            result["pg_flow_runs"] = int(
                pg.psql(
                    "SELECT count(*) FROM flow_run f JOIN flow ON flow.id = f.flow_id WHERE flow.name = 'cohort'"
                )
            )
        return result
    finally:
        os.environ.pop("PREFECT_SERVER_LOG_RETRYABLE_ERRORS", None)
        _stop(watcher)
        _stop(worker)
        if server is not None:
            stop_server(home)
            server.wait(timeout=60)
        if pg is not None:
            os.environ.pop("PGPASSFILE", None)
            if not keep:
                pg.close()


COLUMNS = [
    ("backend", "backend"),
    ("runs", "runs"),
    ("completed", "completed"),
    ("wall_s", "wall s"),
    ("runs_per_min", "runs/min"),
    ("locked", "'database is locked' lines"),
    ("create_retries", "create 503s"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("failed", "failed"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the figures."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the load test on the chosen backends and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--runs", type=int, default=8, help="concurrent cohort runs (plus 1 from the watcher)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds the runs may take, per backend")
    ap.add_argument("--database", help="an existing PostgreSQL URL (password via PGPASSFILE/PGPASSWORD)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temp folder, deleted afterwards)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and args.database is None and os.geteuid() != 0:
        ap.error(
            "--backend postgres makes its own PostgreSQL with postgres-up.sh: run as root or give --database"
        )
    work = args.work or Path(tempfile.mkdtemp(prefix="stamp-load-"))
    rows = []
    try:
        for backend in backends:
            row = run_backend(
                backend, args.runs, work / backend, database=args.database, timeout=args.timeout
            )
            rows.append(row)
            print(f"{backend}: " + json.dumps({k: v for k, v in row.items() if k != "logs"}), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
