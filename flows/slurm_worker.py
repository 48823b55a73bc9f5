"""A Prefect worker (pool type ``stamp-slurm``) that runs each flow run as one SLURM batch job via ``sbatch``.

Why not ``prefect-slurm``: it talks to slurmrestd REST API v0.0.40-0.0.42 (Slurm >= 23.11); Debian 12 ships
Slurm 22.05, whose slurmrestd serves v0.0.36-0.0.38 only (see ``deployments/slurm/README.md``). This worker
needs only the SLURM client commands on the worker host (``sbatch``, ``scontrol``, ``scancel``).

Each flow run becomes ``sbatch`` of a script (fed on stdin, so secrets in the environment never land in a
file we write): exports of the run's environment, ``source`` of ``source_files`` (activate the venv), ``cd
working_dir``, then the flow-run command (``prefect flow-run execute``). The SLURM job id is the flow run's
``infrastructure_pid``; the worker polls ``scontrol show job`` until the job ends, and cancelling the flow
run ``scancel``s the job.

Start it with ``python -m stamp_flows.slurm_worker start --pool NAME`` (creates the pool if missing);
``python -m stamp_flows.slurm_worker template`` prints the pool's base job template.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
from pathlib import Path
from typing import Any

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseJobConfiguration, BaseWorker, BaseWorkerResult
from pydantic import Field

WORKER_TYPE = "stamp-slurm"
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmJobConfiguration(BaseJobConfiguration):
    """Job variables of a ``stamp-slurm`` pool: what one flow run's SLURM job asks for."""

    partition: str | None = Field(
        default=None, description="SLURM partition (e.g. `gpu`); none: the default."
    )
    cpu: int = Field(default=1, ge=1, description="CPUs for the job (`--cpus-per-task`).")
    memory: float = Field(default=4, gt=0, description="Memory in GB (`--mem`).")
    gpus: int = Field(default=0, ge=0, description="GPUs for the job (`--gpus`); 0: none.")
    gres: str | None = Field(
        default=None, description="Raw `--gres` value (e.g. `gpu:a100:1`); used instead of `gpus` when set."
    )
    time_limit: float = Field(default=1, gt=0, description="Wall-time limit in hours (`--time`).")
    working_dir: Path | None = Field(
        default=None, description="Directory the job runs in (`--chdir`); none: the worker's directory."
    )
    source_files: list[Path] = Field(
        default_factory=list,
        description="Files `source`d before the flow run, e.g. `/path/.venv/bin/activate`.",
    )
    output_dir: Path | None = Field(
        default=None,
        description="Where `slurm-<jobid>.out` goes; none: the working directory.",
    )
    sbatch_args: list[str] = Field(
        default_factory=list, description="Extra `sbatch` options, e.g. `--account=lab` or `--qos=short`."
    )
    poll_seconds: float = Field(default=5, gt=0, description="How often the worker polls `scontrol`.")

    def sbatch_command(self) -> list[str]:
        """The ``sbatch`` command line (the script comes on stdin)."""
        workdir = self.working_dir or Path.cwd()
        out_dir = self.output_dir or workdir
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name={self.name or 'prefect-flow-run'}",
            f"--chdir={workdir}",
            f"--output={out_dir / 'slurm-%j.out'}",
            f"--cpus-per-task={self.cpu}",
            f"--mem={max(1, math.ceil(self.memory * 1024))}M",
            f"--time={max(1, math.ceil(self.time_limit * 60))}",
        ]
        if self.partition:
            cmd.append(f"--partition={self.partition}")
        if self.gres:
            cmd.append(f"--gres={self.gres}")
        elif self.gpus:
            cmd.append(f"--gpus={self.gpus}")
        return cmd + list(self.sbatch_args)

    def job_script(self) -> str:
        """The batch script: environment, ``source_files``, ``cd``, then the flow-run command."""
        lines = ["#!/bin/bash", f"# Prefect flow run {self.name or ''} (stamp-slurm worker)"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items()) if v is not None]
        lines += [f"source {shlex.quote(str(f))} || exit 97" for f in self.source_files]
        if self.working_dir:
            lines.append(f"cd {shlex.quote(str(self.working_dir))} || exit 98")
        lines.append('echo "stamp-slurm: job ${SLURM_JOB_ID} on $(hostname) in $(pwd)"')
        lines.append(f"exec {self.command or 'prefect flow-run execute'}")
        return "\n".join(lines) + "\n"


class SlurmWorkerResult(BaseWorkerResult):
    """``identifier`` is the SLURM job id; ``status_code`` 0 when the job COMPLETED."""


async def _run(*cmd: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    return proc.returncode or 0, out.decode(), err.decode()


def parse_scontrol(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of ``scontrol -o show job`` output (one line)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


async def job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol -o show job ID`` as a dict; None when SLURM no longer knows the job."""
    rc, out, err = await _run("scontrol", "-o", "show", "job", job_id)
    if rc != 0:
        if "Invalid job id" in err:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed: {err.strip() or out.strip()}")
    return parse_scontrol(out)


def exit_status(info: dict[str, str] | None) -> int:
    """0 for COMPLETED; the job's exit code otherwise (at least 1; -1 when SLURM forgot the job)."""
    if info is None:
        return -1
    if info.get("JobState") == "COMPLETED":
        return 0
    code, _, signal = info.get("ExitCode", "1:0").partition(":")
    if int(code or 0):
        return int(code)
    return 128 + int(signal) if int(signal or 0) else 1


class SlurmWorker(BaseWorker[SlurmJobConfiguration, Any, SlurmWorkerResult]):
    """Runs each flow run of a ``stamp-slurm`` pool as one SLURM job (``sbatch``), polled until it ends."""

    type = WORKER_TYPE
    job_configuration = SlurmJobConfiguration
    _description = "Runs each flow run as a SLURM batch job through sbatch (no slurmrestd needed)."

    async def run(
        self,
        flow_run: FlowRun,
        configuration: SlurmJobConfiguration,
        task_status: anyio.abc.TaskStatus[Any] | None = None,
    ) -> SlurmWorkerResult:
        """Submit the flow run's job, report its id as started, and wait until SLURM says it ended."""
        logger = self.get_flow_run_logger(flow_run)
        cmd = configuration.sbatch_command()
        rc, out, err = await _run(*cmd, stdin=configuration.job_script())
        if rc != 0:
            raise RuntimeError(f"sbatch failed (exit {rc}): {err.strip() or out.strip()}")
        job_id = out.strip().split(";")[0]
        logger.info("Submitted flow run %s as SLURM job %s: %s", flow_run.name, job_id, shlex.join(cmd))
        if task_status is not None:
            task_status.started(job_id)
        info: dict[str, str] | None = {"JobState": "PENDING"}
        failures = 0
        while info is not None and info.get("JobState", "PENDING") not in TERMINAL_STATES:
            try:
                info = await job_info(job_id)
                failures = 0
            except RuntimeError as exc:  # slurmctld busy or restarting: retry a few polls
                failures += 1
                if failures > 5:
                    raise
                logger.warning("%s (retrying)", exc)
            if info is not None and info.get("JobState", "PENDING") not in TERMINAL_STATES:
                await asyncio.sleep(configuration.poll_seconds)
        status = exit_status(info)
        state = info.get("JobState", "?") if info else "purged"
        log = logger.info if status == 0 else logger.error
        log("SLURM job %s ended: %s (exit %s); output %s", job_id, state, status, _stdout_path(info))
        if status != 0:
            logger.error("last lines of the job output:\n%s", _tail(_stdout_path(info)))
        return SlurmWorkerResult(identifier=job_id, status_code=status)

    async def kill_infrastructure(
        self, infrastructure_pid: str, configuration: SlurmJobConfiguration, grace_seconds: int = 30
    ) -> None:
        """``scancel`` the job of a cancelled flow run (``infrastructure_pid`` is the SLURM job id)."""
        info = await job_info(infrastructure_pid)
        if info is None or info.get("JobState") in TERMINAL_STATES:
            raise InfrastructureNotFound(f"SLURM job {infrastructure_pid} is not running")
        rc, out, err = await _run("scancel", infrastructure_pid)
        if rc != 0:
            raise RuntimeError(f"scancel {infrastructure_pid} failed: {err.strip() or out.strip()}")


def _stdout_path(info: dict[str, str] | None) -> str:
    return (info or {}).get("StdOut", "?")


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


async def create_pool(name: str, job_variables: dict[str, Any] | None = None) -> None:
    """Create (or update) a ``stamp-slurm`` work pool whose variable defaults are ``job_variables``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    template = SlurmWorker.get_default_base_job_template()
    for key, value in (job_variables or {}).items():
        if key not in template["variables"]["properties"]:
            raise ValueError(f"unknown job variable {key!r} for a {WORKER_TYPE} pool")
        template["variables"]["properties"][key]["default"] = value
    async with get_client() as client:
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=name, type=WORKER_TYPE, base_job_template=template)
            )
        except ObjectAlreadyExists:
            await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


def main(argv: list[str] | None = None) -> None:
    """``start --pool P [--limit N] [--name W]``, ``create-pool P [--set KEY=JSON ...]`` or ``template``."""
    parser = argparse.ArgumentParser(
        prog="python -m stamp_flows.slurm_worker", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="poll a stamp-slurm pool and run its flow runs as SLURM jobs")
    start.add_argument("--pool", required=True)
    start.add_argument("--name", default=None)
    start.add_argument("--limit", type=int, default=None, help="at most N flow runs (jobs) at a time")
    start.add_argument("--run-once", action="store_true", help="one polling round, then wait for its jobs")
    create = sub.add_parser("create-pool", help="create or update a stamp-slurm work pool")
    create.add_argument("pool")
    create.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="job-variable default")
    sub.add_parser("template", help="print the base job template (JSON)")
    args = parser.parse_args(argv)
    if args.cmd == "template":
        print(json.dumps(SlurmWorker.get_default_base_job_template(), indent=2))
    elif args.cmd == "create-pool":
        values = {}
        for item in args.set:
            key, sep, raw = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected KEY=JSON, e.g. partition='\"gpu\"' or cpu=2")
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                values[key] = raw
        asyncio.run(create_pool(args.pool, values))
    else:
        worker = SlurmWorker(work_pool_name=args.pool, name=args.name, limit=args.limit)
        asyncio.run(worker.start(run_once=args.run_once))


if __name__ == "__main__":
    main()
