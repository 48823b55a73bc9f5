"""Several ``preprocess`` runs on one output folder share the work; kill -9 then rerun finishes the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stamp.features import read_features
from stamp.synthetic import write_cohort
from tests.conftest import REPO_ROOT, leftover_temps

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cc-cohort")
    write_cohort(root, n_patients=4, seed=11, size=2048, variants=False)
    return root / "slides"


def _start(cfg: dict, tmp: Path, slow: float, prefect_api: str) -> subprocess.Popen[str]:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    path = tmp / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        "PYTHONPATH": str(REPO_ROOT),
    }
    cmd = [sys.executable, "-m", "tests.preprocess_runner", str(path), str(slow)]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _cfg(slides: Path, out: Path) -> dict:
    return {"output_dir": str(out), "wsi_dir": str(slides), "extractor": "demo", "max_workers": 1}


@pytest.mark.timeout(600)
def test_two_runs_share_the_work(slides: Path, tmp_path: Path, prefect_api: str) -> None:
    cfg = _cfg(slides, tmp_path / "features")
    a, b = _start(cfg, tmp_path, 1.0, prefect_api), _start(cfg, tmp_path, 1.0, prefect_api)
    ra, rb = _result(a), _result(b)
    n = len(list(slides.glob("*.svs")))
    assert ra["counts"]["failed"] == rb["counts"]["failed"] == 0
    assert ra["counts"]["done"] + rb["counts"]["done"] == n, "each slide must be computed exactly once"
    for r in (ra, rb):
        assert r["counts"]["done"] + r["counts"]["cached"] + r["counts"]["skipped"] == n
    h5s = list((tmp_path / "features").rglob("*.h5"))
    assert len(h5s) == n and all(len(read_features(p).feats) > 0 for p in h5s)
    assert not leftover_temps(tmp_path / "features") and not list((tmp_path / "features").rglob("*.lock"))


@pytest.mark.timeout(600)
def test_kill_9_then_rerun_finishes_only_the_rest(slides: Path, tmp_path: Path, prefect_api: str) -> None:
    from stamp.config_models import PreprocessingConfig
    from stamp_flows.preprocess import run_preprocess

    out = tmp_path / "features"
    cfg = _cfg(slides, out) | {"tile_size_um": 200.0}  # not computed by another test: no cache hits
    proc = _start(cfg, tmp_path, 3.0, prefect_api)
    deadline = time.monotonic() + 300
    while not list(out.rglob("*.h5")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()  # SIGKILL, mid-run
    proc.communicate()
    finished = {p.name for p in out.rglob("*.h5")}
    n = len(list(slides.glob("*.svs")))
    assert 0 < len(finished) < n, "the run must have been killed mid-way"
    result = run_preprocess(PreprocessingConfig.model_validate(cfg), task_concurrency=2)
    assert result["counts"]["failed"] == 0, [r for r in result["rows"] if r["status"] == "failed"]
    assert result["counts"]["cached"] == len(finished)
    assert result["counts"]["done"] == n - len(finished)
    assert len(list(out.rglob("*.h5"))) == n
    assert not leftover_temps(out) and not list(out.rglob("*.lock"))
