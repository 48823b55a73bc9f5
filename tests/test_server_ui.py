"""A real local Prefect server: the demo's runs, per-slide task runs and artifacts reach it; the UI is served.

Screenshots go to ``test-artifacts/`` (git-ignored). Chromium comes from Debian's ``chromium`` package,
installed by ``deployments/ui/install-chromium.sh`` when missing (or set ``STAMP_CHROMIUM``).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.local_prefect import server_auth

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


class _Browser:
    """Headless Chromium driven over the DevTools protocol (the UI keeps its login in localStorage)."""

    def __init__(self, chromium: str, profile: Path) -> None:
        import json
        import urllib.request

        import websockets.sync.client

        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # we run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        port = None
        for line in self.proc.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                port = found.group(1)
                break
        assert port, "chromium did not open its DevTools port"
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websockets.sync.client.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        import json

        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=120))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return dict(message.get("result", {}))

    def open(self, url: str, settle_s: float = 4.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)

    def dom(self) -> str:
        result = self.call("Runtime.evaluate", expression="document.documentElement.outerHTML")
        return str(result["result"]["value"])

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            dom = self.dom()
            if text in dom or time.monotonic() > deadline:
                return dom
            time.sleep(1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _post(api: str, home: Path, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    from tests.local_prefect import server_post

    return list(server_post(api, home, path, body))


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

        (run,) = _post(api, home, "/flow_runs/filter", {"flows": {"name": {"any_": ["demo"]}}})
        assert run["state_type"] == "COMPLETED"
        (pre,) = _post(api, home, "/flow_runs/filter", {"flows": {"name": {"any_": ["preprocess"]}}})
        assert pre["state_type"] == "COMPLETED"
        slides = sorted(p.name for p in (out / "cohort" / "slides").glob("*.svs"))
        tasks = _post(api, home, "/task_runs/filter", {"flow_runs": {"id": {"any_": [pre["id"]]}}})
        per_slide = sorted(t["name"] for t in tasks if t["name"].startswith("preprocess-"))
        assert per_slide == [f"preprocess-{s}" for s in slides]
        assert {t["state_type"] for t in tasks if t["name"].startswith("preprocess-")} == {"COMPLETED"}

        artifacts = _post(
            api, home, "/artifacts/filter", {"artifacts": {"key": {"any_": list(DEMO_ARTIFACT_KEYS)}}}
        )
        assert set(DEMO_ARTIFACT_KEYS) <= {a["key"] for a in artifacts}
        table = next(a for a in artifacts if a["key"] == "preprocess-slides")
        assert table["type"] == "table" and len(_table_rows(table["data"])) == len(slides)

        # a real browser: without the auth string the UI shows no runs (H1); logged in, it renders the
        # runs page (the demo run on it), the preprocess run and the artifacts
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        t0 = time.monotonic()
        browser = _Browser(chromium, tmp_path / "chromium-profile")
        try:
            browser.open(f"{ui}/v2/runs", settle_s=8)
            assert run["name"] not in browser.dom(), "the UI listed runs to a browser without the auth string"
            secret = base64.b64encode(server_auth(home).encode()).decode()
            browser.call(
                "Runtime.evaluate", expression=f"localStorage.setItem('prefect-password', '{secret}')"
            )
            browser.open(f"{ui}/v2/runs")
            assert run["name"] in browser.wait_for(run["name"]), "the demo flow run is not listed in the UI"
            for name, url in (
                ("prefect-ui-runs.png", f"{ui}/v2/runs"),
                ("prefect-ui-preprocess-run.png", f"{ui}/v2/runs/flow-run/{pre['id']}"),  # per-slide tasks
                ("prefect-ui-artifacts.png", f"{ui}/v2/artifacts"),
            ):
                shot = ARTIFACTS_DIR / name
                shot.unlink(missing_ok=True)
                browser.open(url, settle_s=6)
                browser.screenshot(shot)
                assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            browser.close()
        times["chromium (login + 4 page loads)"] = time.monotonic() - t0
    finally:
        stop_server(home)
        server.wait(timeout=30)
        print("\nserver/UI timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def _table_rows(data: Any) -> list[Any]:
    """A table artifact's rows (the API returns the table as a JSON string)."""
    import json

    rows = json.loads(data) if isinstance(data, str) else data
    return rows if isinstance(rows, list) else list(zip(*rows.values(), strict=True))
