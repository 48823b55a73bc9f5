"""deployments/: work pools + prefect.yaml registered against a Prefect API and read back; docker job rendered."""

from __future__ import annotations

import asyncio
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp.stages import STAGES
from stamp_flows.deployments import (
    PREFECT_YAML,
    REPO_ROOT,
    ZOMBIE_AUTOMATION,
    DeploymentError,
    base_job_template,
    ensure_work_pools,
    load_pool_specs,
    planned_deployments,
    register_deployments,
)

VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
STAGE_FLOWS = {  # stage -> (entrypoint, image): every built stage that has an image runs as a deployment
    s.name: (s.flow_file, f"stamp-{s.image}") for s in STAGES if s.built and s.image is not None
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
    docker = base_job_template(specs["stamp-docker"])
    job = docker["job_configuration"]
    assert all(v.endswith(":ro") for v in job["volumes"] if "/data" in v or "/weights" in v)
    assert job["env"]["HF_HUB_OFFLINE"] == "1"
    slurm = base_job_template(specs["stamp-slurm"])
    assert slurm["variables"]["properties"]["partition"]["default"] == "gpu"
    assert slurm["variables"]["properties"]["gpus"]["default"] == 1
    assert slurm["job_configuration"]["working_dir"] == str(REPO_ROOT.resolve())


#: What a run must never choose (H1): each is fixed in the pool's job configuration, not a job variable.
FIXED = {
    "stamp-process": {"command", "env", "working_dir"},
    "stamp-docker": {
        "command",
        "env",
        "privileged",
        "volumes",
        "network_mode",
        "networks",
        "container_create_kwargs",
        "image_pull_policy",
        "registry_credentials",
        "mem_limit",
    },
    "stamp-slurm": {"command", "env", "working_dir", "source_files", "sbatch_args", "gres", "output_dir"},
}


def test_pools_fix_what_a_run_must_not_choose() -> None:
    for name, spec in load_pool_specs().items():
        template = base_job_template(spec)
        variables = template["variables"]
        assert variables["additionalProperties"] is False, name
        assert not FIXED[name] & set(variables["properties"]), name
        assert "{{" not in str(
            {k: template["job_configuration"][k] for k in FIXED[name] - {"container_create_kwargs"}}
        )
    docker = base_job_template(load_pool_specs()["stamp-docker"])["job_configuration"]
    kwargs = docker["container_create_kwargs"]
    assert docker["privileged"] is False and docker["command"] is None
    assert kwargs["cap_drop"] == ["ALL"] and kwargs["read_only"] is True and kwargs["user"] == "10001"
    assert "/tmp" in kwargs["tmpfs"] and kwargs["pids_limit"] > 0 and docker["mem_limit"]
    assert docker["network_mode"] is None and docker["networks"] == ["stamp-jobs"]


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
        register_deployments()


# ----------------------------------------------------------------------------- against the test API


@pytest.fixture(scope="module")
def registered(prefect_api: str) -> list[str]:
    return register_deployments()


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
            assert (docker.job_variables["device_requests"] == [GPU]) == (stage != "statistics")
            assert docker.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/stamp"}}
            ]
            slurm = client.read_deployment_by_name(f"{stage}/slurm")
            assert slurm.work_pool_name == "stamp-slurm" and slurm.job_variables["time_limit"] >= 1
        cohort = client.read_deployment_by_name("cohort/process")
        assert cohort.entrypoint == "flows/cohort.py:cohort_flow" and cohort.work_pool_name == "stamp-process"
        assert cohort.parameter_openapi_schema.get("required", []) == []  # config_path or a watcher snapshot
        watch = client.read_deployment_by_name("watch/process")
        assert watch.parameters == {"inbox": "/srv/stamp/inbox"} and not watch.schedules[0].active
        automations = [a for a in client.read_automations() if a.name == "cohort-ready-runs-cohort"]
    (automation,) = automations
    assert automation.trigger.expect == {"stamp.cohort.ready"}
    assert automation.trigger.match.model_dump() == {"prefect.resource.id": "stamp.cohort.*"}
    (action,) = automation.actions
    assert action.deployment_id == cohort.id
    assert action.parameters == {
        "snapshot_path": "{{ event.payload.snapshot_path }}",
        "snapshot_sha256": "{{ event.payload.snapshot_sha256 }}",
    }
    with get_client(sync_client=True) as client:
        limits = {n: client.read_work_pool(n).concurrency_limit for n in FIXED}
        (zombie,) = [a for a in client.read_automations() if a.name == ZOMBIE_AUTOMATION]
    assert (
        limits == {n: load_pool_specs()[n].concurrency_limit for n in FIXED} and limits["stamp-docker"] == 1
    )
    assert zombie.trigger.posture == "Proactive" and zombie.trigger.after == {"prefect.flow-run.heartbeat"}
    assert zombie.actions[0].state == "CRASHED"


HOSTILE = [  # (deployment, job variables a run asks for)
    ("preprocess/docker", {"privileged": True}),
    ("preprocess/docker", {"volumes": ["/:/host"]}),
    ("preprocess/docker", {"command": "sh -c 'id > /srv/stamp/work/pwned'"}),
    ("preprocess/docker", {"container_create_kwargs": {"user": "0", "cap_add": ["SYS_ADMIN"]}}),
    ("preprocess/docker", {"network_mode": "host"}),
    ("preprocess/docker", {"env": {"LD_PRELOAD": "/srv/stamp/work/evil.so"}}),
    ("preprocess/docker", {"image": "docker.io/attacker/image:latest"}),
    (
        "preprocess/docker",
        {"device_requests": [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]},
    ),
    ("cohort/process", {"command": "touch /tmp/pwned"}),
    ("cohort/process", {"working_dir": "/tmp/attacker"}),
    ("cohort/process", {"env": {"PYTHONPATH": "/tmp/attacker"}}),
    ("train/slurm", {"sbatch_args": ["--wrap=touch /tmp/pwned"]}),
    ("train/slurm", {"source_files": ["/tmp/attacker.sh"]}),
    ("train/slurm", {"output_dir": "/home/someone/.ssh"}),
    ("train/slurm", {"memory": 100000}),
]


def _parameters(dep: Any) -> dict[str, Any]:
    """Values of the right type for the deployment's required parameters (the run is never executed)."""
    schema = dep.parameter_openapi_schema
    sample = {"string": "/srv/stamp/inbox/c/config.yaml", "object": {}, "boolean": False, "integer": 0}
    return {
        name: sample.get(schema["properties"][name].get("type", "object"), {})
        for name in schema.get("required", [])
    }


@pytest.mark.parametrize(("deployment", "job_variables"), HOSTILE)
def test_server_refuses_a_run_that_overrides_what_the_pool_fixes(
    registered: list[str], deployment: str, job_variables: dict[str, Any]
) -> None:
    """H1: through the real API, a run asking for a privileged container, a host mount, another command..."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        with pytest.raises(Exception, match="Validation failed") as refused:
            client.create_flow_run_from_deployment(
                dep.id, parameters=_parameters(dep), job_variables=job_variables
            )
        assert str(next(iter(job_variables))) in str(refused.value) or "is not one of" in str(refused.value)
        allowed = {"train/slurm": {"memory": 128}, "cohort/process": {}}.get(deployment, {"shm_size": "2g"})
        run = client.create_flow_run_from_deployment(
            dep.id, parameters=_parameters(dep), job_variables=allowed
        )
        client.delete_flow_run(run.id)  # the control: the same run with what a run may choose is accepted


def test_an_existing_looser_pool_is_brought_to_the_template(registered: list[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    specs = load_pool_specs()
    loose = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        client.delete_work_pool("stamp-process")
        client.create_work_pool(WorkPoolCreate(name="stamp-process", type="process", base_job_template=loose))
    assert ensure_work_pools(["stamp-process"]) == ["stamp-process"]
    assert ensure_work_pools(["stamp-process"]) == []  # already as written
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("stamp-process")
    assert pool.base_job_template == base_job_template(specs["stamp-process"])
    assert pool.concurrency_limit == specs["stamp-process"].concurrency_limit


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
    assert settings["security_opt"] == ["no-new-privileges"] and settings["cap_drop"] == ["ALL"]
    assert settings["read_only"] is True and settings["tmpfs"]["/tmp"].startswith("rw,nosuid,nodev")
    assert settings["pids_limit"] == 2048 and settings["mem_limit"] == settings["memswap_limit"] == "64g"
    assert settings["shm_size"] == "8g"
    assert settings["network"] == "stamp-jobs" and settings["network_mode"] is None
    mounts = {v.split(":")[1]: v.split(":")[2:] for v in settings["volumes"]}
    assert mounts["/srv/stamp/data"] == ["ro"] and mounts["/srv/stamp/weights"] == ["ro"]
    assert mounts["/srv/stamp/work"] == []  # outputs are written
    env = settings["environment"]
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "STAMP_WEIGHTS_DIR" not in env, "the pool must not hide the weights baked into the image"
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id)
    assert settings["command"] == "prefect flow-run execute"


def test_a_run_whose_heartbeats_stop_is_marked_crashed(registered: list[str]) -> None:
    """The automation deploy-flows installs, acting for real: one heartbeat, then silence -> Crashed."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.states import Running

    from stamp_flows.deployments import ensure_zombie_automation

    def drop_zombie_automation() -> None:
        with get_client(sync_client=True) as client:
            for automation in client.read_automations():
                if automation.name == ZOMBIE_AUTOMATION:
                    client.delete_automation(automation.id)

    drop_zombie_automation()
    assert ensure_zombie_automation(silent_for_s=10) is True
    assert ensure_zombie_automation(silent_for_s=10) is False  # once
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("cohort/process")
            silent = client.create_flow_run_from_deployment(dep.id, parameters=_parameters(dep))
            beating = client.create_flow_run_from_deployment(dep.id, parameters=_parameters(dep))
            for run in (silent, beating):
                client.set_flow_run_state(run.id, Running(), force=True)
        emit_event(
            event="prefect.flow-run.heartbeat",
            resource={"prefect.resource.id": f"prefect.flow-run.{silent.id}"},
        )
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline:
            emit_event(
                event="prefect.flow-run.heartbeat",
                resource={"prefect.resource.id": f"prefect.flow-run.{beating.id}"},
            )
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(silent.id).state
                alive = client.read_flow_run(beating.id).state
            if state is not None and state.type.value == "CRASHED":
                break
            time.sleep(2)
        assert state is not None and state.type.value == "CRASHED", state
        assert "no heartbeat" in (state.message or "")
        assert alive is not None and alive.type.value == "RUNNING"  # a run that keeps beating is left alone
    finally:
        drop_zombie_automation()
        ensure_zombie_automation()


def test_stamp_worker_starts_the_pools_own_worker(prefect_api: str, tmp_path: Path) -> None:
    """`stamp worker --pool`: the right worker type for the pool, against the configured server."""
    import os
    import subprocess
    import sys

    from stamp_flows.deployments import worker_command

    assert worker_command("stamp-slurm", ["--limit", "2"])[1:] == [
        "-m", "stamp_flows.slurm_worker", "start", "--pool", "stamp-slurm", "--limit", "2",
    ]  # fmt: skip
    assert worker_command("stamp-docker")[-2:] == ["--type", "docker"]
    with pytest.raises(DeploymentError, match=r"unknown work pool 'gpu-pool'.*stamp-process"):
        worker_command("gpu-pool")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-c", "import sys; from stamp.cli import main; sys.exit(main())", "worker"]
    bad = subprocess.run([*cli, "--pool", "gpu-pool"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unknown work pool 'gpu-pool'" in bad.stderr
    pool = f"stamp-worker-probe-{uuid.uuid4().hex[:6]}"
    probe = tmp_path / "work-pools.yaml"
    probe.write_text(yaml.safe_dump({"pools": {pool: {"type": "process"}}}))
    argv = worker_command(pool, ["--run-once"], work_pools_yaml=probe)
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"  # the worker reached this server
