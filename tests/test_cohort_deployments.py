"""``stamp run`` with ``orchestration.deployments``: a stage runs as Prefect deployment runs, sharded.

Fast: :func:`stage_plan` / :func:`stage_parameters` / :func:`run_stage` decide the stages, their order and
the parameters each run gets. Slow: a real ``prefect server``, the ``stamp-process`` pool and a process
worker; ``stamp -c config.yaml run`` splits preprocessing over 2 runs of ``preprocess/shard-test``, each a
subflow of the ``cohort`` run, which together write every slide's features exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from stamp.config import load_config
from stamp.config_models import StampConfig
from stamp.stages import STAGES
from stamp_flows import cohort as cohort_mod
from stamp_flows.cohort import stage_parameters, stage_plan
from tests.conftest import REPO_ROOT
from tests.local_prefect import deploy_from_repo, server_auth, worker_env

EXAMPLE_CONFIG = REPO_ROOT / "stamp" / "config.yaml"  # the shipped example: every section present


# --------------------------------------------------------------------------- fast: plan and parameters


def _with_training(cfg: StampConfig) -> StampConfig:
    """The example config plus a ``training`` section (the example has ``crossval`` only)."""
    assert cfg.crossval is not None
    data = cfg.model_dump(mode="json", exclude_none=True)
    data["training"] = {k: v for k, v in data["crossval"].items() if k != "n_splits"}
    return StampConfig.model_validate(data)


def test_stage_plan_order_and_parameters_for_a_full_config() -> None:
    cfg = _with_training(load_config(EXAMPLE_CONFIG))
    assert all(getattr(cfg, s.section) is not None for s in STAGES), "every section is set"
    # crossval wins over training when both are there
    assert stage_plan(cfg) == [
        "preprocess",
        "encode_slides",
        "encode_patients",
        "crossval",
        "deploy",
        "statistics",
        "heatmaps",
    ]
    # explicit stages come back in pipeline order, whatever order they were given in
    assert stage_plan(cfg, ["heatmaps", "train", "preprocess"]) == ["preprocess", "train", "heatmaps"]
    assert stage_plan(cfg, ["train", "crossval"]) == ["crossval", "train"]

    assert cfg.preprocessing is not None and cfg.deployment is not None
    pre = stage_parameters("preprocess", cfg)
    assert pre == {"config": cfg.preprocessing.model_dump(mode="json")}
    assert pre["config"]["extractor"] == "ctranspath" and pre["config"]["wsi_dir"] == "/path/to/slides"
    cv = stage_parameters("crossval", cfg)
    assert set(cv) - {"task_concurrency"} == {"section", "advanced"}
    assert (
        cv.get("task_concurrency", cfg.orchestration.task_concurrency) == cfg.orchestration.task_concurrency
    )
    assert cv["section"]["n_splits"] == 5 and cv["section"]["ground_truth_label"] == "KRAS"
    assert cv["advanced"] == cfg.advanced_config.model_dump(mode="json")  # type: ignore[union-attr]
    train = stage_parameters("train", cfg)
    assert set(train) == {"section", "advanced"} and "n_splits" not in train["section"]
    assert stage_parameters("deploy", cfg) == {"section": cfg.deployment.model_dump(mode="json")}
    for stage in ("statistics", "heatmaps"):
        assert set(stage_parameters(stage, cfg)) == {"section"}
    # parameters travel to deployments: plain JSON
    for stage in ("preprocess", "crossval", "train", "deploy", "statistics", "heatmaps"):
        assert json.loads(json.dumps(stage_parameters(stage, cfg))) == stage_parameters(stage, cfg)


def test_training_runs_when_there_is_no_crossval() -> None:
    data = _with_training(load_config(EXAMPLE_CONFIG)).model_dump(mode="json", exclude_none=True)
    del data["crossval"]
    cfg = StampConfig.model_validate(data)
    assert "train" in stage_plan(cfg) and "crossval" not in stage_plan(cfg)
    # advanced_config missing: the defaults travel
    data.pop("advanced_config", None)
    advanced = stage_parameters("train", StampConfig.model_validate(data))["advanced"]
    assert advanced["bag_size"] == 512 and advanced["max_epochs"] == 32


def test_explicit_stages_need_their_sections(tmp_path: Path) -> None:
    cfg = StampConfig.model_validate(
        {"preprocessing": {"output_dir": str(tmp_path / "f"), "wsi_dir": str(tmp_path), "extractor": "demo"}}
    )
    assert stage_plan(cfg) == ["preprocess"]
    with pytest.raises(ValueError) as err:
        stage_plan(cfg, ["preprocess", "train", "heatmaps"])
    msg = str(err.value)
    assert "train (section 'training')" in msg and "heatmaps (section 'heatmaps')" in msg
    assert "preprocess" not in msg.split("stage(s)")[1]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]"):
        stage_plan(cfg, ["trian"])


def test_preprocess_deployment_gets_one_run_per_shard(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    section = {"output_dir": str(tmp_path / "f"), "wsi_dir": str(tmp_path), "extractor": "demo"}
    cfg = StampConfig.model_validate(
        {
            "preprocessing": section,
            "statistics": {
                "output_dir": str(tmp_path / "s"),
                "pred_csvs": [str(tmp_path / "p.csv")],
                "ground_truth_label": "y",
            },
            "orchestration": {
                "deployments": {"preprocess": "preprocess/gpu", "statistics": "statistics/cpu"},
                "preprocess_shards": 3,
            },
        }
    )
    calls: list[tuple[str, str, list[dict[str, Any]]]] = []

    def fake(stage: str, name: str, runs: list[dict[str, Any]], timeout: float | None) -> dict[str, Any]:
        assert timeout is None
        calls.append((stage, name, runs))
        return {"deployment": name}

    monkeypatch.setattr(cohort_mod, "_as_deployments", fake)
    cohort_mod.run_stage("preprocess", cfg)
    cohort_mod.run_stage("statistics", cfg)
    config = stage_parameters("preprocess", cfg)["config"]
    assert calls[0] == (
        "preprocess",
        "preprocess/gpu",
        [{"config": config, "shard": i, "shards": 3} for i in range(3)],
    )
    assert calls[1] == ("statistics", "statistics/cpu", [stage_parameters("statistics", cfg)])


def test_deployment_runs_without_a_worker_time_out_and_are_cancelled(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from stamp_flows.cohort import StageFailed, _as_deployments

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"), overwrite=True)
    deployment_id = deploy_from_repo("flows/statistics.py:statistics_flow", "idle", "nobody-polls")
    with pytest.raises(StageFailed, match=r"statistics/idle not finished after 2 s .*worker polling") as err:
        _as_deployments("statistics", "statistics/idle", [{"section": {}}], timeout=2)
    assert "\n" not in str(err.value)
    with get_client(sync_client=True) as client:
        runs = [
            r for r in client.read_flow_runs() if r.deployment_id == deployment_id
        ]  # this test's runs only
    assert runs and all(r.state is not None and r.state.is_cancelled() for r in runs)


# --------------------------------------------------------------------------- slow: real server + worker


def _write_cohort(folder: Path, n: int = 4) -> list[str]:
    from stamp.synthetic import SlideSpec, write_slide

    for i in range(n):
        spec = SlideSpec(width=1536, height=1536, mpp=0.5, seed=i)
        write_slide(folder / "slides" / f"slide-{i}.svs", spec)
    return [f"slide-{i}.svs" for i in range(n)]


def _config(folder: Path) -> Path:
    config = {
        "preprocessing": {
            "output_dir": str(folder / "features"),
            "wsi_dir": str(folder / "slides"),
            "extractor": "demo",
            "tile_size_um": 128.0,
            "max_workers": 1,
            "device": "cpu",
        },
        "orchestration": {
            "task_concurrency": 1,
            "deployments": {"preprocess": "preprocess/shard-test"},
            "preprocess_shards": 2,
        },
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _table_rows(client: Any, flow_run_id: UUID) -> list[dict[str, Any]]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(
        key=ArtifactFilterKey(any_=["preprocess-slides"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    (artifact,) = client.read_artifacts(artifact_filter=flt)
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_cohort_runs_preprocess_as_two_deployment_shards(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterId,
    )
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from stamp_flows.deployments import ensure_work_pools
    from stamp_flows.server import start_server, stop_server

    home = tmp_path / "prefect-home"
    clock: dict[str, float] = {}
    t0 = time.monotonic()
    server, api = start_server(home)
    clock["server start"] = time.monotonic() - t0
    env = worker_env(tmp_path, home, api)
    worker = None
    worker_log = tmp_path / "worker.log"
    try:
        t0 = time.monotonic()
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: server_auth(home)}):
            assert ensure_work_pools(["stamp-process"]) == ["stamp-process"]
            deployment_id = deploy_from_repo(
                "flows/preprocess.py:preprocess_flow", "shard-test", "stamp-process", ignore_warnings=True
            )
        clock["pool + deploy"] = time.monotonic() - t0
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "stamp-process", "--limit", "2"],
            cwd=REPO_ROOT,
            env=env,
            stdout=worker_log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cohort = tmp_path / "cohort"
        t0 = time.monotonic()
        slides = _write_cohort(cohort)
        config = _config(cohort)
        clock["synthetic cohort"] = time.monotonic() - t0

        t0 = time.monotonic()
        stamp = Path(sys.executable).parent / "stamp"
        proc = subprocess.run(
            [str(stamp), "-c", str(config), "run"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
        clock["stamp run"] = time.monotonic() - t0
        logs = (
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}\n"
            f"worker log:\n{worker_log.read_text(errors='replace')[-4000:]}"
        )
        assert proc.returncode == 0, logs
        assert "| preprocess | completed |" in proc.stdout, logs

        with (
            temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: server_auth(home)}),
            get_client(sync_client=True) as client,
        ):
            (parent,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["cohort"])))
            assert parent.state is not None and parent.state.is_completed()
            assert parent.parameters["config_path"] == str(config.resolve())
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
            )
            assert len(runs) == 2, [(r.name, r.parameters) for r in runs]
            runs.sort(key=lambda r: r.parameters["shard"])
            section = load_config(config).preprocessing
            assert section is not None
            for i, run in enumerate(runs):
                assert run.state is not None and run.state.type.value == "COMPLETED", (run.state, logs)
                assert run.parameters == {
                    "config": section.model_dump(mode="json"),
                    "shard": i,
                    "shards": 2,
                }
                # a subflow of the cohort run: its parent task run lives in the cohort flow run
                assert run.parent_task_run_id is not None
                # run by the process worker: each shard in its own subprocess
                assert run.infrastructure_pid, run
                (link,) = client.read_task_runs(
                    task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=[run.parent_task_run_id]))
                )
                assert link.flow_run_id == parent.id
            assert runs[0].infrastructure_pid != runs[1].infrastructure_pid
            # each shard processed every 2nd slide of the sorted list: disjoint halves of the cohort
            processed = [sorted(row["slide"] for row in _table_rows(client, run.id)) for run in runs]
            assert processed == [sorted(slides)[0::2], sorted(slides)[1::2]]
            assert all(row["status"] == "done" for run in runs for row in _table_rows(client, run.id))
            for run, expected in zip(runs, processed, strict=True):
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
                )
                names = sorted(t.name for t in tasks if t.name.startswith("preprocess-"))
                assert names == [f"preprocess-{s}" for s in expected]
        # every slide's features exist exactly once
        h5 = sorted((cohort / "features").rglob("*.h5"))
        assert sorted(p.name for p in h5) == sorted(s.replace(".svs", ".h5") for s in slides), h5
        assert len({p.parent for p in h5}) == 1
    finally:
        _stop_group(worker)
        stop_server(home)
        server.wait(timeout=30)
        print("\ncohort deployments e2e (s): " + ", ".join(f"{k} {v:.1f}" for k, v in clock.items()))
