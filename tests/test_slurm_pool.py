"""The ``stamp-slurm`` work pool: job script and sbatch options (fast), and a real stage as a SLURM job (slow).

The slow test starts a single-node SLURM cluster (``deployments/slurm/slurm-up.sh``, root + apt), a real
``prefect server``, a ``stamp-slurm`` pool and worker, deploys ``flows/preprocess.py:preprocess_flow`` and
checks that its run COMPLETED inside a SLURM job on partition ``gpu`` with one (placeholder) GPU and wrote
the feature files. Everything it started is stopped in ``finally`` (worker, server, SLURM daemons by PID).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import h5py
import pytest

from stamp_flows.slurm_worker import (
    WORKER_TYPE,
    SlurmJobConfiguration,
    SlurmWorker,
    exit_status,
    parse_scontrol,
)
from tests.conftest import REPO_ROOT
from tests.local_prefect import deploy_from_repo

SLURM_DIR = REPO_ROOT / "deployments" / "slurm"
POOL_VARIABLES = (
    "partition",
    "cpu",
    "memory",
    "gpus",
    "gres",
    "time_limit",
    "working_dir",
    "source_files",
    "env",
)


# --------------------------------------------------------------------------- fast: configuration


def test_pool_template_has_the_job_variables() -> None:
    template = SlurmWorker.get_default_base_job_template()
    props = template["variables"]["properties"]
    assert SlurmWorker.type == WORKER_TYPE == "stamp-slurm"
    for key in POOL_VARIABLES:
        assert key in props and template["job_configuration"][key] == "{{ " + key + " }}"
    assert (
        props["memory"]["default"] == 4
        and props["time_limit"]["default"] == 1
        and props["gpus"]["default"] == 0
    )


def test_sbatch_options_and_job_script(tmp_path: Path) -> None:
    cfg = SlurmJobConfiguration(
        name="run-1",
        partition="gpu",
        cpu=2,
        memory=1.5,
        gpus=1,
        time_limit=0.25,
        working_dir=tmp_path,
        output_dir=tmp_path / "logs",
        source_files=[Path("/opt/venv/bin/activate")],
        sbatch_args=["--qos=short"],
        env={"PREFECT__FLOW_RUN_ID": "abc", "QUOTED": "a b'c", "DROPPED": None},
        command="prefect flow-run execute",
    )
    cmd = cfg.sbatch_command()
    assert cmd[:2] == ["sbatch", "--parsable"]
    for opt in (
        "--job-name=run-1",
        f"--chdir={tmp_path}",
        f"--output={tmp_path / 'logs' / 'slurm-%j.out'}",
        "--cpus-per-task=2",
        "--mem=1536M",
        "--time=15",
        "--partition=gpu",
        "--gpus=1",
        "--qos=short",
    ):
        assert opt in cmd
    # the job's variables travel by name through sbatch's environment, never as values in the script
    export = next(o for o in cmd if o.startswith("--export="))
    assert {"PREFECT__FLOW_RUN_ID", "QUOTED", "PATH"} <= set(export.removeprefix("--export=").split(","))
    assert "DROPPED" not in export and cfg.sbatch_environment()["QUOTED"] == "a b'c"
    script = cfg.job_script()
    assert script.startswith("#!/bin/bash\n")
    assert "DROPPED" not in script and "abc" not in script
    lines = script.splitlines()
    assert not any(line.startswith("export") for line in lines)
    assert lines.index("source /opt/venv/bin/activate || exit 97") < lines.index(f"cd {tmp_path} || exit 98")
    assert lines[-1] == "exec prefect flow-run execute"
    # a raw gres wins over the GPU count; no partition/GPU options when not asked for
    assert "--gres=gpu:a100:2" in SlurmJobConfiguration(gres="gpu:a100:2", gpus=1).sbatch_command()
    plain = SlurmJobConfiguration().sbatch_command()
    assert not any(o.startswith(("--partition", "--gpus", "--gres")) for o in plain)


def test_scontrol_parsing_and_exit_status() -> None:
    line = (
        "JobId=7 JobName=x JobState=COMPLETED Reason=None ExitCode=0:0 Partition=gpu StdOut=/tmp/slurm-7.out"
    )
    info = parse_scontrol(line)
    assert info["JobState"] == "COMPLETED" and info["StdOut"] == "/tmp/slurm-7.out" and exit_status(info) == 0
    assert exit_status(parse_scontrol("JobState=FAILED ExitCode=3:0")) == 3
    assert exit_status(parse_scontrol("JobState=CANCELLED ExitCode=0:15")) == 143
    assert exit_status(parse_scontrol("JobState=TIMEOUT ExitCode=0:0")) == 1
    assert exit_status(None) == -1


# --------------------------------------------------------------------------- slow: a real SLURM job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux: slurm-up.sh installs packages and starts munged/slurmctld/slurmd"
    if not (shutil.which("sbatch") or shutil.which("apt-get")):
        return "SLURM is not installed and apt-get is unavailable to install it"
    return None


def _job_when_ended(job_id: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
        info = parse_scontrol(shown.stdout)
        if info.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return shown, info
        time.sleep(1)


async def _final_run(flow_run_id, timeout: float):  # noqa: ANN001, ANN202
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                return run
            await asyncio.sleep(2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preprocess_runs_as_a_slurm_job_through_the_pool() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stamp.synthetic import write_cohort
    from stamp_flows.slurm_worker import create_pool

    # job outputs must be reachable by slurmd/slurmstepd: a world-traversable dir, not pytest's 0700 tmp
    work = Path(tempfile.mkdtemp(prefix="stamp-slurm-test-"))
    work.chmod(0o755)
    state = work / "slurm-state"
    env = {
        **os.environ,
        "STAMP_SLURM_STATE": str(state),
        "STAMP_SLURM_GPUS": "1",  # one placeholder GPU, so the pool's `gpus` variable is really scheduled
        "PREFECT_HOME": str(work / "prefect-home"),
        "STAMP_HOME": str(work / "stamp-home"),  # the worker's default job log folder is in there
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = worker = None
    server_log, worker_log = work / "server.log", work / "worker.log"
    clock: dict[str, float] = {"start": time.monotonic()}
    try:
        up = subprocess.run(
            ["bash", str(SLURM_DIR / "slurm-up.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        assert up.returncode == 0, f"slurm-up.sh failed:\n{up.stderr}"
        clock["slurm_up"] = time.monotonic()
        with server_log.open("w") as out:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        cohort = work / "cohort"
        write_cohort(cohort, n_patients=2, seed=5, size=1536, variants=False)
        slides = sorted((cohort / "slides").glob("*.svs"))
        assert slides
        _wait_health(api, server, server_log)
        clock["server_healthy"] = time.monotonic()
        env["PREFECT_API_URL"] = api

        pool = "slurm-test"
        features = work / "features"
        config: dict[str, Any] = {
            "wsi_dir": str(cohort / "slides"),
            "output_dir": str(features),
            "extractor": "demo",
        }
        config |= {"max_workers": 2, "device": "cpu", "generate_hash": False}
        with temporary_settings({PREFECT_API_URL: api}):
            asyncio.run(create_pool(pool, {"partition": "gpu", "time_limit": 0.5}))
            env_check = work / "env-check.sh"  # sourced in the job: prints what the job's environment holds
            env_check.write_text(
                'echo "env-check STAMP_SLURM_TEST=${STAMP_SLURM_TEST:-unset}'
                ' WORKER_ONLY=${STAMP_WORKER_ONLY:-unset} AUTH=${PREFECT_API_AUTH_STRING:-unset}"\n'
            )
            deployment_id = deploy_from_repo(
                "flows/preprocess.py:preprocess_flow",
                "preprocess-slurm",
                pool,
                parameters={"config": config},
                job_variables={
                    "cpu": 2,
                    "memory": 4,
                    "gpus": 1,
                    "working_dir": str(REPO_ROOT),
                    "source_files": [str(REPO_ROOT / ".venv" / "bin" / "activate"), str(env_check)],
                    "env": {"STAMP_SLURM_TEST": "from-the-pool"},
                },
            )
            run = cast(FlowRun, run_deployment(deployment_id, timeout=0))
            clock["run_created"] = time.monotonic()
            # the worker holds a secret of its own and an API auth string (the server ignores it here)
            worker_env = {**env, "STAMP_WORKER_ONLY": "leak", "PREFECT_API_AUTH_STRING": "slurm-test-auth"}
            with worker_log.open("w") as out:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "stamp_flows.slurm_worker", "start", "--pool", pool],
                    env=worker_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=work,
                )
            run = asyncio.run(_final_run(run.id, timeout=420))
            clock["run_final"] = time.monotonic()
        logs = f"worker log:\n{worker_log.read_text()[-4000:]}"
        assert run.state is not None and run.state.is_completed(), f"flow run {run.state}\n{logs}"

        # it ran as a SLURM job: the job id is the run's infrastructure_pid
        job_id = run.infrastructure_pid
        assert job_id and job_id.isdigit(), logs
        shown, info = _job_when_ended(job_id)  # the run is Completed just before its process exits
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", shown.stdout
        assert info["Partition"] == "gpu" and info["NumCPUs"] == "2", shown.stdout
        assert "gpu:1" in shown.stdout and "mem=4G" in shown.stdout, shown.stdout
        log_dir = work / "stamp-home" / "slurm-logs"
        out_file = log_dir / f"slurm-{job_id}.out"
        assert Path(info["StdOut"]) == out_file and f"stamp-slurm: job {job_id} on " in out_file.read_text()
        assert log_dir.stat().st_mode & 0o777 == 0o700
        # the job got the pool's env and the auth string, not the worker's other variables ...
        assert "env-check STAMP_SLURM_TEST=from-the-pool WORKER_ONLY=unset AUTH=slurm-test-auth" in (
            out_file.read_text()
        )
        # ... and the batch script slurmctld keeps names them but holds no value
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True
        ).stdout
        assert f"source {REPO_ROOT / '.venv' / 'bin' / 'activate'}" in script
        exported = next(line for line in script.splitlines() if line.startswith("# environment from"))
        for name in ("STAMP_SLURM_TEST", "PREFECT__FLOW_RUN_ID", "PREFECT_API_AUTH_STRING", "PATH"):
            assert name in exported.split(), exported
        assert "STAMP_WORKER_ONLY" not in script
        assert "slurm-test-auth" not in script and "from-the-pool" not in script and str(run.id) not in script

        # the stage's outputs: one feature file per slide with STAMP's datasets
        feat_dir = features / "demo"
        for slide in slides:
            h5 = feat_dir / f"{slide.stem}.h5"
            assert h5.exists(), f"{h5} missing; {sorted(p.name for p in feat_dir.glob('*'))}"
            with h5py.File(h5) as f:
                assert f.attrs["extractor"] == "demo"
                assert f["feats"].ndim == 2 and f["feats"].shape[0] == f["coords"].shape[0] > 0
        assert "| done |" in (feat_dir / "summary.md").read_text()
        # figures for the report (shown with -s); never asserted
        marks = list(clock.items())
        steps = ", ".join(f"{k} +{t - marks[i][1]:.1f}s" for i, (k, t) in enumerate(marks[1:]))
        print(f"\n[slurm-pool] {steps}; job RunTime={info['RunTime']}; slurm-up: {up.stderr.strip()[-200:]}")
    finally:
        _stop(worker)
        _stop(server)
        subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)
