"""A Prefect worker (pool type ``stamp-slurm``) that runs each flow run as one SLURM batch job via ``sbatch``.

Why not ``prefect-slurm``: it talks to slurmrestd REST API v0.0.40-0.0.42 (Slurm >= 23.11); Debian 12 ships
Slurm 22.05, whose slurmrestd serves v0.0.36-0.0.38 only (see ``deployments/slurm/README.md``). This worker
needs only the SLURM client commands on the worker host (``sbatch``, ``scontrol``, ``scancel``).

Each flow run becomes ``sbatch`` of a script fed on stdin: ``source`` of ``source_files`` (activate the venv),
``cd working_dir``, then the flow-run command (``prefect flow-run execute``). The SLURM job id is the flow
run's ``infrastructure_pid``; the worker polls ``scontrol show job`` until the job ends, and cancelling the
flow run ``scancel``s the job.

What reaches the shell is built so that no job variable can add a shell line: env names must be shell
variable names, the run name is reduced to ``[A-Za-z0-9._-]``, every path is ``shlex.quote``d and the command
is an argument list (``shlex.split`` then ``shlex.join``, as Prefect's process worker runs it, without a shell).

The environment does not travel in the script. slurmctld keeps every batch script (``scontrol write
batch_script``, and accounting may store it), so an ``export`` line would put the Prefect API auth string
there. Instead sbatch runs with the job's variables in its own environment and ``--export=NAME,...`` lists
exactly which of them the job gets (values are never on a command line either): the run's ``env`` (Prefect's
settings such as ``PREFECT_API_URL``/``PREFECT_API_AUTH_STRING``, ``PREFECT__FLOW_RUN_ID``, the pool's
``env``), a few basics from the worker (``PATH``, ``HOME``, ``LANG`` ...) and the worker's Prefect API
settings. Anything else in the worker's environment (tokens, keys) stays out of the job; SLURM adds its
``SLURM_*`` variables and the user's login environment on the node. Job output goes to a 0700 folder,
by default ``$STAMP_HOME/slurm-logs`` (``~/.stamp/slurm-logs``).

Start it with ``python -m stamp_flows.slurm_worker start --pool NAME`` (creates the pool if missing);
``python -m stamp_flows.slurm_worker template`` prints the pool's base job template.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseJobConfiguration, BaseWorker, BaseWorkerResult
from pydantic import Field

from stamp.fileio import make_private_dir, unsafe_folder_reason

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
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# taken from the worker's environment when set (the run's ``env`` overrides them)
BASIC_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
)
PREFECT_API_ENV = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")
# sbatch options that would hand the job the worker's whole environment or replace the script
FORBIDDEN_SBATCH_OPTIONS = ("export", "export-file", "wrap")
DEFAULT_COMMAND = "prefect flow-run execute"


def default_log_dir() -> Path:
    """``$STAMP_HOME/slurm-logs`` (``~/.stamp/slurm-logs``): where job output goes when ``output_dir`` is unset."""
    return Path(os.environ.get("STAMP_HOME") or Path.home() / ".stamp") / "slurm-logs"


def check_env_name(key: str) -> None:
    """Raise ValueError unless ``key`` may be a job environment variable (a shell name sbatch passes as is)."""
    where = "rename it in the work pool's or deployment's env"
    if not ENV_NAME.fullmatch(key):
        raise ValueError(
            f"env key {key!r} of the stamp-slurm job is not a shell variable name "
            f"(letters, digits and _, not starting with a digit): {where}"
        )
    if key.upper() in ("ALL", "NONE"):
        raise ValueError(f"env key {key!r} of the stamp-slurm job is a keyword of sbatch --export: {where}")
    if key.startswith(("SLURM_", "SBATCH_")):
        raise ValueError(
            f"env key {key!r} of the stamp-slurm job would configure sbatch/SLURM itself: "
            "put sbatch options in sbatch_args instead"
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
        description="Folder (created 0700) for `slurm-<jobid>.out`; none: `$STAMP_HOME/slurm-logs`.",
    )
    sbatch_args: list[str] = Field(
        default_factory=list, description="Extra `sbatch` options, e.g. `--account=lab` or `--qos=short`."
    )
    poll_seconds: float = Field(default=5, gt=0, description="How often the worker polls `scontrol`.")

    def job_name(self) -> str:
        """The run name reduced to ``[A-Za-z0-9._-]`` (at most 64 characters): one safe word for sbatch
        ``--job-name``, the script's comment and ``scontrol`` output."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name or "").strip("-.")[:64]
        return safe or "prefect-flow-run"

    def log_dir(self) -> Path:
        """Where ``slurm-<jobid>.out`` goes: ``output_dir`` or :func:`default_log_dir`."""
        return self.output_dir or default_log_dir()

    def prepare_log_dir(self) -> Path:
        """Create the log folder with mode 0700; raise ValueError when an existing one is not private."""
        folder = self.log_dir()
        make_private_dir(folder)
        reason = unsafe_folder_reason(folder)
        if reason:
            raise ValueError(
                f"output_dir {folder} of the stamp-slurm job {reason}: "
                "make it a folder only you can write (chmod 700) or set output_dir to another one"
            )
        return folder

    def job_environment(self, worker_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables the job gets: the basics and Prefect API settings of ``worker_env`` (default
        ``os.environ``), then the run's ``env`` (a None value drops the name). Raises ValueError for a
        name that is not a plain shell variable name."""
        worker_env = os.environ if worker_env is None else worker_env
        env = {k: worker_env[k] for k in (*BASIC_ENV, *PREFECT_API_ENV) if k in worker_env}
        for key, value in self.env.items():
            check_env_name(key)
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def sbatch_environment(self, worker_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment sbatch itself runs with: the worker's (sbatch reads its own ``SLURM_CONF`` /
        ``SBATCH_*`` settings there) plus :meth:`job_environment`; only the names in ``--export`` reach the job."""
        worker_env = os.environ if worker_env is None else worker_env
        return {**worker_env, **self.job_environment(worker_env)}

    def sbatch_command(self, worker_env: Mapping[str, str] | None = None) -> list[str]:
        """The ``sbatch`` command line (the script comes on stdin); ``--export`` names the job's variables."""
        for arg in self.sbatch_args:
            name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
            if name and any(opt.startswith(name) for opt in FORBIDDEN_SBATCH_OPTIONS):
                raise ValueError(
                    f"sbatch_args {arg!r} of the stamp-slurm job would override what the worker sets "
                    "(--export, --export-file, --wrap): pass variables in env instead"
                )
        names = sorted(self.job_environment(worker_env))
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name={self.job_name()}",
            f"--chdir={self.working_dir or Path.cwd()}",
            f"--output={self.log_dir() / 'slurm-%j.out'}",
            f"--export={','.join(names) or 'NONE'}",
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

    def command_argv(self) -> list[str]:
        """``command`` (default ``prefect flow-run execute``) as an argument list; ValueError when it is not one."""
        command = self.command or DEFAULT_COMMAND
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(
                f"command {command!r} of the stamp-slurm job is not an argument list ({exc}): fix its quoting"
            ) from None
        if not argv:
            raise ValueError(
                "command of the stamp-slurm job is empty: leave it unset for prefect flow-run execute"
            )
        return argv

    def job_script(self) -> str:
        """The batch script: ``source_files``, ``cd``, then ``exec`` of the command; no environment values
        (they go through ``sbatch --export``, see the module docstring)."""
        names = " ".join(sorted(self.job_environment()))
        lines = [
            "#!/bin/bash",
            f"# Prefect flow run {self.job_name()} (stamp-slurm worker)",
            f"# environment from sbatch --export: {names}",
        ]
        lines += [f"source {shlex.quote(str(f))} || exit 97" for f in self.source_files]
        if self.working_dir:
            lines.append(f"cd {shlex.quote(str(self.working_dir))} || exit 98")
        lines.append('echo "stamp-slurm: job ${SLURM_JOB_ID} on $(hostname) in $(pwd)"')
        lines.append(f"exec {shlex.join(self.command_argv())}")
        return "\n".join(lines) + "\n"


class SlurmWorkerResult(BaseWorkerResult):
    """``identifier`` is the SLURM job id; ``status_code`` 0 when the job COMPLETED."""


async def _run(
    *cmd: str, stdin: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        env=None if env is None else dict(env),
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
        configuration.prepare_log_dir()
        cmd = configuration.sbatch_command()
        script = configuration.job_script()
        rc, out, err = await _run(*cmd, stdin=script, env=configuration.sbatch_environment())
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
