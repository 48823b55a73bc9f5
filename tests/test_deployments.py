"""deployments/: work pools + prefect.yaml registered against a Prefect API and read back; docker job rendered."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp_flows.deployments import (
    PREFECT_YAML,
    REPO_ROOT,
    DeploymentError,
    base_job_template,
    deploy_flows,
    load_pool_specs,
    planned_deployments,
)

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
STAGE_FLOWS = {  # flow -> (entrypoint, image)
    "preprocess": ("flows/preprocess.py:preprocess_flow", "stamp-preprocess"),
    "crossval": ("flows/modeling.py:crossval_flow", "stamp-modeling"),
    "train": ("flows/modeling.py:train_flow", "stamp-modeling"),
    "deploy": ("flows/modeling.py:deploy_flow", "stamp-modeling"),
    "statistics": ("flows/report.py:statistics_flow", "stamp-report"),
    "heatmaps": ("flows/report.py:heatmaps_flow", "stamp-report"),
}
GPU = {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}


def test_plan_has_every_stage_on_docker_and_slurm_plus_cohort_and_watch() -> None:
    planned = dict(planned_deployments())
    expected = {"cohort/process", "watch/process"}
    expected |= {f"{s}/{pool}" for s in STAGE_FLOWS for pool in ("docker", "slurm")}
    assert set(planned) == expected
    for stage, (entrypoint, image) in STAGE_FLOWS.items():
        docker = planned[f"{stage}/docker"]
        assert docker["entrypoint"] == entrypoint
        assert docker["work_pool"]["job_variables"]["image"] == f"localhost/{image}:{VERSION}"
        slurm = planned[f"{stage}/slurm"]["work_pool"]
        assert slurm["name"] == "stamp-slurm"
        assert {"partition", "memory", "time_limit"} <= set(slurm["job_variables"])


def test_pools_have_the_three_types_and_customised_templates() -> None:
    specs = load_pool_specs()
    assert {n: s.type for n, s in specs.items()} == {
        "stamp-process": "process",
        "stamp-docker": "docker",
        "stamp-slurm": "stamp-slurm",
    }
    props = base_job_template(specs["stamp-docker"])["variables"]["properties"]
    assert all(v.endswith(":ro") for v in props["volumes"]["default"] if "/data" in v or "/weights" in v)
    assert props["env"]["default"]["HF_HUB_OFFLINE"] == "1"
    slurm = base_job_template(specs["stamp-slurm"])["variables"]["properties"]
    assert slurm["partition"]["default"] == "gpu" and slurm["gpus"]["default"] == 1
    assert slurm["working_dir"]["default"] == str(REPO_ROOT.resolve())


def _yaml_with(tmp_path: Path, job_variables: dict[str, Any]) -> Path:
    source = yaml.safe_load(PREFECT_YAML.read_text())
    entry = next(
        d for d in source["deployments"] if d["entrypoint"].endswith("train_flow") and d["name"] == "slurm"
    )
    entry["work_pool"]["job_variables"] = job_variables
    source["deployments"] = [entry]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(source))
    return path


def test_bad_job_variables_are_refused_before_registering(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match=r"train/slurm.*'memory' = 'lots' is refused"):
        planned_deployments(_yaml_with(tmp_path, {"memory": "lots"}))
    with pytest.raises(DeploymentError, match=r"'gpu' is not a job variable of this pool; known: .*gpus"):
        planned_deployments(_yaml_with(tmp_path, {"gpu": 1}))


def test_deploy_needs_a_server() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(DeploymentError, match="server"),
    ):
        deploy_flows()


# ----------------------------------------------------------------------------- against the test API


@pytest.fixture(scope="module")
def registered(prefect_api: str) -> list[str]:
    return deploy_flows()


def test_registered_deployments_read_back(registered: list[str]) -> None:
    from prefect.client.orchestration import get_client

    assert len(registered) == 14 and "cohort/process" in registered
    with get_client(sync_client=True) as client:
        pools = {p.name: p for p in client.read_work_pools()}
        assert {pools[n].type for n in ("stamp-process", "stamp-docker", "stamp-slurm")} == {
            "process",
            "docker",
            "stamp-slurm",
        }
        for stage, (entrypoint, image) in STAGE_FLOWS.items():
            docker = client.read_deployment_by_name(f"{stage}/docker")
            assert (docker.entrypoint, docker.work_pool_name) == (entrypoint, "stamp-docker")
            assert docker.job_variables["image"] == f"localhost/{image}:{VERSION}"
            kwargs = docker.job_variables["container_create_kwargs"]
            assert kwargs["user"] == "10001"
            assert (kwargs.get("device_requests") == [GPU]) == (stage != "statistics")
            assert docker.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/stamp"}}
            ]
            slurm = client.read_deployment_by_name(f"{stage}/slurm")
            assert slurm.work_pool_name == "stamp-slurm" and slurm.job_variables["time_limit"] >= 1
        cohort = client.read_deployment_by_name("cohort/process")
        assert cohort.entrypoint == "flows/cohort.py:cohort_flow" and cohort.work_pool_name == "stamp-process"
        assert cohort.parameter_openapi_schema["required"] == ["config_path"]
        watch = client.read_deployment_by_name("watch/process")
        assert watch.parameters == {"inbox": "/srv/stamp/inbox"} and not watch.schedules[0].active
        automations = [a for a in client.read_automations() if a.name == "cohort-ready-runs-cohort"]
    (automation,) = automations
    assert automation.trigger.expect == {"stamp.cohort.ready"}
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": "stamp.cohort.*"}
    (action,) = automation.actions
    assert action.deployment_id == cohort.id
    assert action.parameters == {"config_path": "{{ event.payload.config_path }}", "relative_to_config": True}


def test_server_refuses_a_bad_job_variable(registered: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("train/slurm")
        with pytest.raises(Exception, match=r"memory.*'lots' is not"):
            client.create_deployment(
                flow_id=dep.flow_id,
                name="bad-memory",
                entrypoint=dep.entrypoint,
                work_pool_name="stamp-slurm",
                job_variables={"memory": "lots"},
            )
        with pytest.raises(Exception, match=r"memory.*'lots' is not"):
            client.create_flow_run_from_deployment(
                dep.id, parameters={"section": {}, "advanced": {}}, job_variables={"memory": "lots"}
            )
        assert [d.name for d in client.read_deployments() if d.name == "bad-memory"] == []


class _FakeDocker:
    """Enough of docker-py's client for the worker to render container settings (no engine needed)."""

    def version(self) -> dict[str, str]:
        return {"Version": "27.3.1"}


def test_docker_job_renders_image_gpu_readonly_mounts_env_and_user(registered: list[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("preprocess/docker")
        pool = client.read_work_pool("stamp-docker")
        flow = client.read_flow(dep.flow_id)
    config = asyncio.run(
        DockerWorkerJobConfiguration.from_template_and_values(pool.base_job_template, dep.job_variables)
    )
    run = FlowRun(id=uuid.uuid4(), flow_id=flow.id, deployment_id=dep.id, name="rendered-run")
    config.prepare_for_flow_run(run, deployment=dep, flow=flow, work_pool=pool)
    settings = DockerWorker(work_pool_name="stamp-docker")._build_container_settings(_FakeDocker(), config)

    assert settings["image"] == f"localhost/stamp-preprocess:{VERSION}"
    assert config.image_pull_policy == "Never"
    assert settings["device_requests"] == [GPU]
    assert settings["user"] == "10001" and not settings["privileged"]
    assert settings["security_opt"] == ["no-new-privileges"]
    mounts = {v.split(":")[1]: v.split(":")[2:] for v in settings["volumes"]}
    assert mounts["/srv/stamp/data"] == ["ro"] and mounts["/srv/stamp/weights"] == ["ro"]
    assert mounts["/srv/stamp/work"] == []  # outputs are written
    env = settings["environment"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "STAMP_WEIGHTS_DIR" not in env, "the pool must not hide the weights baked into the image"
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert settings["command"] == "prefect flow-run execute"
