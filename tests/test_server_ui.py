"""A real local Prefect server: the demo's runs, per-slide task runs and artifacts reach it; the UI is served.

Screenshots go to ``test-artifacts/`` (git-ignored). Chromium comes from Debian's ``chromium`` package,
installed by ``deployments/ui/install-chromium.sh`` when missing (or set ``STAMP_CHROMIUM``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
INSTALL_CHROMIUM = REPO_ROOT / "deployments" / "ui" / "install-chromium.sh"

#: Artifact keys one `stamp demo` run must publish (extend as stages add theirs).
DEMO_ARTIFACT_KEYS = (
    "preprocess-slides",
    "preprocess-summary",
    "crossval-folds",
    "crossval-summary",
    "statistics-metrics",
    "statistics-plots",
    "heatmaps-slides",
    "heatmaps-gallery",
    "cohort-report",
    "demo-report",
)
DEMO_PATIENTS = 12  # enough for 5 stratified folds, small enough for 2 cores


def _chromium() -> str:
    proc = subprocess.run(["bash", str(INSTALL_CHROMIUM)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{INSTALL_CHROMIUM} failed: {proc.stderr.strip()}"
    return proc.stdout.strip().splitlines()[-1]


def _browse(chromium: str, url: str, *args: str) -> str:
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,900",
        "--virtual-time-budget=20000",
        *args,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _post(api: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    import httpx

    resp = httpx.post(f"{api}{path}", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()


@pytest.mark.slow
def test_demo_runs_show_up_in_a_local_server_and_its_ui(tmp_path: Path) -> None:
    import httpx

    from stamp_flows.server import start_server, stop_server

    chromium = _chromium()
    home = tmp_path / "prefect-home"
    times: dict[str, float] = {}
    t0 = time.monotonic()
    server, api = start_server(home)  # what `stamp server` runs
    times["server start (fresh DB)"] = time.monotonic() - t0
    ui = api.removesuffix("/api")
    try:
        # the UI is served by the server itself, offline, and talks to this server's API
        ui_api = httpx.get(f"{ui}/ui-settings").json()["api_url"]
        assert ui_api == api, (
            f"the UI would call {ui_api}, not this server ({api}): start the server with "
            "PREFECT_SERVER_API_HOST/PREFECT_SERVER_API_PORT (or PREFECT_UI_API_URL) set to its host and port"
        )
        index = httpx.get(f"{ui}/", headers={"Accept": "text/html"}, follow_redirects=True)
        assert index.status_code == 200 and '<div id="root">' in index.text  # the V2 (React) UI
        hosts = set(re.findall(r"""(?:src|href)=["'](https?://[^/"']+)""", index.text))
        assert hosts <= {ui}, f"the UI page loads from other hosts: {hosts}"
        script = re.search(r'<script[^>]+src="([^"]+\.js)"', index.text)
        assert script and httpx.get(f"{ui}{script.group(1)}").status_code == 200

        # `stamp demo` with no PREFECT_API_URL finds the server `stamp server` recorded under PREFECT_HOME
        env = {**os.environ, "PREFECT_HOME": str(home), "STAMP_CACHE_DIR": str(tmp_path / "cache")}
        env.pop("PREFECT_API_URL", None)
        out = tmp_path / "demo"
        cli = "import sys; from stamp.cli import main; sys.exit(main())"
        t0 = time.monotonic()
        demo = subprocess.run(
            [sys.executable, "-c", cli, "demo", "--out", str(out), "--patients", str(DEMO_PATIENTS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        times["stamp demo"] = time.monotonic() - t0
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]

        (run,) = _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["demo"]}}})
        assert run["state_type"] == "COMPLETED"
        (pre,) = _post(api, "/flow_runs/filter", {"flows": {"name": {"any_": ["preprocess"]}}})
        assert pre["state_type"] == "COMPLETED"
        slides = sorted(p.name for p in (out / "cohort" / "slides").glob("*.svs"))
        tasks = _post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [pre["id"]]}}})
        per_slide = sorted(t["name"] for t in tasks if t["name"].startswith("preprocess-"))
        assert per_slide == [f"preprocess-{s}" for s in slides]
        assert {t["state_type"] for t in tasks if t["name"].startswith("preprocess-")} == {"COMPLETED"}

        artifacts = _post(
            api, "/artifacts/filter", {"artifacts": {"key": {"any_": list(DEMO_ARTIFACT_KEYS)}}}
        )
        assert set(DEMO_ARTIFACT_KEYS) <= {a["key"] for a in artifacts}
        table = next(a for a in artifacts if a["key"] == "preprocess-slides")
        assert table["type"] == "table" and len(_table_rows(table["data"])) == len(slides)

        # a real browser renders the runs page (the demo run on it), the preprocess run and the artifacts
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        t0 = time.monotonic()
        dom = _browse(chromium, f"{ui}/v2/runs", "--dump-dom")
        assert run["name"] in dom, "the demo flow run is not listed in the UI's runs page"
        for name, url in (
            ("prefect-ui-runs.png", f"{ui}/v2/runs"),
            ("prefect-ui-preprocess-run.png", f"{ui}/v2/runs/flow-run/{pre['id']}"),  # per-slide tasks
            ("prefect-ui-artifacts.png", f"{ui}/v2/artifacts"),
        ):
            shot = ARTIFACTS_DIR / name
            shot.unlink(missing_ok=True)
            _browse(chromium, url, f"--screenshot={shot}")
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        times["chromium (4 page loads)"] = time.monotonic() - t0
    finally:
        stop_server(home)
        server.wait(timeout=30)
        print("\nserver/UI timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def _table_rows(data: Any) -> list[Any]:
    """A table artifact's rows (the API returns the table as a JSON string)."""
    import json

    rows = json.loads(data) if isinstance(data, str) else data
    return rows if isinstance(rows, list) else list(zip(*rows.values(), strict=True))
