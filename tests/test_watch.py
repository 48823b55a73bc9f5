"""``stamp watch``: complete cohort folders → one event each → one ``cohort`` run each, even across restarts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp_flows.watch import (
    EVENT_NAME,
    READY_MARKER,
    WatchSettings,
    emit_to_server,
    inspect_cohort,
    state_path,
    watch,
    watch_once,
)
from tests.local_prefect import server_post, worker_env


def _cohort(inbox: Path, name: str, *, ready: bool = True, config: dict[str, Any] | None = None) -> Path:
    folder = inbox / name
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    cfg = config or {"preprocessing": {"output_dir": "features", "wsi_dir": "slides", "extractor": "demo"}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    if ready:
        (folder / READY_MARKER).touch()
    return folder


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)


@pytest.fixture
def settings(tmp_path: Path) -> WatchSettings:
    (tmp_path / "inbox").mkdir()
    return WatchSettings.create(tmp_path / "inbox", state_dir=tmp_path / "state", work_root=tmp_path / "work")


def test_only_complete_visible_folders_are_emitted(settings: WatchSettings, tmp_path: Path) -> None:
    inbox = settings.inbox
    _cohort(inbox, "a-ready")
    _cohort(inbox, "b-copying", ready=False)  # config there, READY not yet
    (inbox / "c-no-config").mkdir()
    (inbox / "c-no-config" / READY_MARKER).touch()
    _cohort(inbox, ".hidden")
    (inbox / "loose-file.txt").write_text("x")
    assert watch_once(settings, emit=Recorder()) == ["a-ready"]
    assert sorted(p.name for p in (settings.state_dir / "records").iterdir()) == ["a-ready.json"]
    with pytest.raises(FileNotFoundError, match="inbox .*missing"):
        WatchSettings.create(tmp_path / "missing")


def test_each_cohort_is_emitted_once_across_restarts(settings: WatchSettings) -> None:
    folder = _cohort(settings.inbox, "cohort-1")
    rec = Recorder()
    assert watch_once(settings, emit=rec) == ["cohort-1"]
    (event,) = rec.events
    assert event.event == EVENT_NAME
    assert event.resource.id == "stamp.cohort.cohort-1"
    assert event.payload["config_path"] == str(folder / "config.yaml")
    assert event.payload["cohort_dir"] == str(folder)
    snapshot = Path(event.payload["snapshot_path"])
    assert snapshot.parent == settings.state_dir / "snapshots"
    assert hashlib.sha256(snapshot.read_bytes()).hexdigest() == event.payload["snapshot_sha256"]
    record = json.loads(state_path(settings.state_dir, "cohort-1").read_text())
    assert record["status"] == "emitted" and record["event_id"] == str(event.id)
    # same watcher again, a "restarted" loop, then a second cohort arrives: only the new one is emitted
    assert watch_once(settings, emit=rec) == []
    assert watch(settings, interval=0, max_scans=2, emit=rec) == []
    _cohort(settings.inbox, "cohort-2")
    assert watch_once(settings, emit=rec) == ["cohort-2"]
    assert [e.resource.id for e in rec.events] == ["stamp.cohort.cohort-1", "stamp.cohort.cohort-2"]
    assert not list(settings.state_dir.rglob("*stamp-tmp*"))  # records are written atomically
    assert not (settings.inbox / ".stamp-watch").exists()  # nothing written into the inbox


def test_event_id_is_deterministic(settings: WatchSettings) -> None:
    folder = _cohort(settings.inbox, "c")
    first = inspect_cohort(settings.inbox, "c")
    second = inspect_cohort(settings.inbox, "c")
    assert first is not None and second is not None and second.event_id == first.event_id
    # a re-delivered cohort (READY written again) or a changed config is a new event
    st = (folder / READY_MARKER).stat()
    os.utime(folder / READY_MARKER, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = inspect_cohort(settings.inbox, "c")
    assert again is not None and again.event_id != first.event_id
    (folder / "config.yaml").write_text("preprocessing: {output_dir: o, wsi_dir: s, extractor: demo}\n")
    changed = inspect_cohort(settings.inbox, "c")
    assert changed is not None and changed.event_id not in (first.event_id, again.event_id)


def test_invalid_config_is_recorded_not_emitted(settings: WatchSettings) -> None:
    _cohort(settings.inbox, "bad", config={"preprocessing": {"extractor": "demo", "tile_size_mu": 256}})
    rec = Recorder()
    assert watch_once(settings, emit=rec) == []
    assert rec.events == []
    record = json.loads(state_path(settings.state_dir, "bad").read_text())
    assert record["status"] == "invalid"
    assert record["error"] == (
        "preprocessing.output_dir: missing required key; preprocessing.wsi_dir: missing required key; "
        "preprocessing: unknown key 'tile_size_mu'"
    )
    assert watch_once(settings, emit=rec) == []  # not retried (and not logged) every scan


def test_failed_emit_leaves_no_record_so_the_next_scan_retries(settings: WatchSettings) -> None:
    _cohort(settings.inbox, "c")

    def broken(event: Any) -> None:
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        watch_once(settings, emit=broken)
    assert not state_path(settings.state_dir, "c").exists()
    rec = Recorder()
    assert watch_once(settings, emit=rec) == ["c"]


def test_emitting_needs_a_server(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(RuntimeError, match="stamp server"),
    ):
        emit_to_server(object())


# ----------------------------------------------------------------------------- end to end (slow)


def _flow_runs(api: str, home: Path, flow: str) -> list[dict[str, Any]]:
    return list(server_post(api, home, "/flow_runs/filter", {"flows": {"name": {"any_": [flow]}}}))


def _wait(api: str, home: Path, flow: str, done: Any, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _flow_runs(api, home, flow)
        if done(runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def _run_watcher(inbox: Path, env: dict[str, str]) -> str:
    state, work = inbox.parent / "watch-state", inbox.parent / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stamp_flows.watch",
            str(inbox),
            "--once",
            "--state-dir",
            str(state),
            "--work-root",
            str(work),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _synthetic_cohort(folder: Path) -> Path:
    from stamp.synthetic import SlideSpec, write_slide

    for i in range(2):
        write_slide(folder / "slides" / f"slide-{i}.svs", SlideSpec(width=1536, height=1536, mpp=0.5, seed=i))
    config = {  # relative paths: inputs in the cohort folder, outputs under <work root>/<cohort>
        "preprocessing": {
            "output_dir": "features",
            "wsi_dir": "slides",
            "extractor": "demo",
            "tile_size_um": 128.0,
            "max_workers": 1,
        },
        "orchestration": {"task_concurrency": 1},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml"


@pytest.mark.slow
def test_new_cohort_triggers_exactly_one_cohort_run(tmp_path: Path) -> None:
    from stamp_flows.server import start_server, stop_server

    home = tmp_path / "prefect-home"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    server, api = start_server(home)
    times["server start"] = time.monotonic() - t0
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
        times["deploy-flows (process pool)"] = time.monotonic() - t0
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "stamp-process", "--limit", "1"],
            env=env,
            stdout=open(tmp_path / "worker.log", "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        inbox = tmp_path / "inbox"
        config = _synthetic_cohort(inbox / "cohort-a")
        (inbox / "half-copied").mkdir()  # no READY, no config: must be ignored
        (inbox / "cohort-a" / READY_MARKER).touch()

        t0 = time.monotonic()
        assert "1 cohort(s) triggered: cohort-a" in _run_watcher(inbox, env)
        times["watcher (one scan, own process)"] = time.monotonic() - t0
        t_emit = time.monotonic()
        runs = _wait(api, home, "cohort", lambda r: bool(r), 60)
        times["event -> flow run created"] = time.monotonic() - t_emit
        runs = _wait(
            api, home, "cohort", lambda r: r and r[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED"), 240
        )
        times["event -> cohort run finished"] = time.monotonic() - t_emit
        log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        assert len(runs) == 1, runs
        record = json.loads(state_path(tmp_path / "watch-state", "cohort-a").read_text())
        assert runs[0]["parameters"] == {
            "snapshot_path": record["snapshot_path"],
            "snapshot_sha256": record["snapshot_sha256"],
        }
        assert record["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
        assert runs[0]["state_type"] == "COMPLETED", log
        assert not (inbox / "cohort-a" / "features").exists()
        h5 = sorted((tmp_path / "work" / "cohort-a" / "features").rglob("*.h5"))
        assert [p.name for p in h5] == ["slide-0.h5", "slide-1.h5"]

        # restart the watcher: the record says "done"; then lose the record: the same event id is dropped
        assert "0 cohort(s) triggered" in _run_watcher(inbox, env)
        state_path(tmp_path / "watch-state", "cohort-a").unlink()
        assert "1 cohort(s) triggered: cohort-a" in _run_watcher(inbox, env)
        time.sleep(8)  # > the trigger latency measured above
        runs = _flow_runs(api, home, "cohort")
        assert len(runs) == 1, runs
        assert not list((inbox / "half-copied").iterdir())
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        stop_server(home)
        server.wait(timeout=30)
        print("\nwatch e2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
