"""Security of the ``stamp-slurm`` job (review findings M1, L11): hostile job variables add no shell line,
and the job gets exactly its own environment (no worker secrets, no auth string in the stored script)."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from stamp_flows.slurm_worker import SlurmJobConfiguration

# every shell trick that would run `touch PWNED` if pasted unquoted into a script line (no "/": usable as a
# file name; a balanced-quote variant for `command`, which must stay a valid argument list)
HOSTILE = "x;touch PWNED\ntouch PWNED && $(touch PWNED) `touch PWNED` | touch PWNED #'; touch PWNED; '"
HOSTILE_ARGV = "touch PWNED; touch PWNED\n touch PWNED $(touch PWNED) `touch PWNED` && touch PWNED # x"


def _export_names(cmd: list[str]) -> list[str]:
    exports = [a for a in cmd if a.startswith("--export")]
    assert len(exports) == 1, cmd
    return exports[0].removeprefix("--export=").split(",")


def _hostile_config(tmp_path: Path) -> SlurmJobConfiguration:
    workdir = tmp_path / f"wd{HOSTILE}"
    workdir.mkdir()
    source = tmp_path / f"src{HOSTILE}.sh"
    source.write_text("SOURCED=yes\n")
    return SlurmJobConfiguration(
        name=f"run-1\n{HOSTILE}",
        partition=HOSTILE,
        gres=HOSTILE,
        working_dir=workdir,
        source_files=[source],
        output_dir=tmp_path / f"logs{HOSTILE}",
        sbatch_args=[HOSTILE],
        env={"SAFE_NAME": HOSTILE, "PREFECT__FLOW_RUN_ID": "abc"},
        command=f"echo {HOSTILE_ARGV}",
    )


def test_hostile_job_variables_add_no_shell_line(tmp_path: Path) -> None:
    """Run name, env value, command, paths, partition ... full of `;`, newlines, `$()` and quotes: the script
    parses, runs to its `exec` and passes the command's words literally, and no `touch PWNED` ever runs."""
    cfg = _hostile_config(tmp_path)
    script = tmp_path / "job.sh"
    script.write_text(cfg.job_script())
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    run = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURM_JOB_ID": "7"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.rglob("PWNED*")) == [], run.stdout + run.stderr
    # the script reached its exec, in working_dir, and `echo` got the command's words as they were split
    assert "stamp-slurm: job 7 on " in run.stdout and f"in {cfg.working_dir}" in run.stdout
    assert run.stdout.endswith(" ".join(shlex.split(HOSTILE_ARGV)) + "\n"), run.stdout
    # the name never reaches sbatch or the script with its newline, spaces or `=` (scontrol -o parsing)
    names = [a for a in cfg.sbatch_command() if a.startswith("--job-name=")]
    assert len(names) == 1 and names[0].startswith("--job-name=run-1-x-touch-PWNED-touch-PWNED-")
    assert re.fullmatch(r"--job-name=[A-Za-z0-9._-]{1,64}", names[0])


@pytest.mark.parametrize(
    "key",
    [
        "A; touch PWNED #",
        "A\ntouch PWNED",
        "1A",
        "A-B",
        "$(touch PWNED)",
        "ALL",
        "none",
        "SBATCH_EXPORT",
        "SLURM_CONF",
    ],
)
def test_env_key_that_is_no_plain_variable_name_is_refused(tmp_path: Path, key: str) -> None:
    cfg = SlurmJobConfiguration(env={key: "v"}, output_dir=tmp_path)
    for build in (cfg.job_script, cfg.sbatch_command):
        with pytest.raises(ValueError, match=r"env key .* of the stamp-slurm job") as info:
            build()
        assert repr(key) in str(info.value) and "\n" not in str(info.value)


def test_command_must_be_an_argument_list() -> None:
    cfg = SlurmJobConfiguration(command="prefect flow-run execute 'unclosed")
    with pytest.raises(ValueError, match=r"command .* of the stamp-slurm job is not an argument list"):
        cfg.job_script()


def test_job_gets_only_its_env_and_the_basics_and_no_value_is_in_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the job sees is exactly `--export`'s names, valued from sbatch's environment: the run's env, the
    basics and the Prefect API settings; the worker's other variables stay out, the auth string is not in the
    script that slurmctld stores."""
    worker = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/w",
        "LANG": "C.UTF-8",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PREFECT_API_AUTH_STRING": "admin:s3cret-auth",
        "WORKER_TOKEN": "tok-leak",
        "AWS_SECRET_ACCESS_KEY": "aws-leak",
    }
    monkeypatch.setattr(os, "environ", worker)
    cfg = SlurmJobConfiguration(
        output_dir=tmp_path / "logs",
        env={"PREFECT__FLOW_RUN_ID": "abc", "DO_NOT_TRACK": "1", "LANG": None, "QUOTED": "a b,c\nd"},
    )
    cmd = cfg.sbatch_command()
    names = _export_names(cmd)
    expected = ["DO_NOT_TRACK", "HOME", "PATH", "PREFECT_API_AUTH_STRING", "PREFECT_API_URL"]
    assert names == sorted([*expected, "PREFECT__FLOW_RUN_ID", "QUOTED"])
    sbatch_env = cfg.sbatch_environment()
    job_sees = {k: sbatch_env[k] for k in names}  # what sbatch --export=NAMES hands the job
    assert job_sees["PREFECT_API_AUTH_STRING"] == "admin:s3cret-auth" and job_sees["QUOTED"] == "a b,c\nd"
    assert (
        "WORKER_TOKEN" not in job_sees and "AWS_SECRET_ACCESS_KEY" not in job_sees and "LANG" not in job_sees
    )
    script = cfg.job_script()
    for value in ("s3cret-auth", "tok-leak", "abc", "127.0.0.1"):
        assert value not in script
    assert not any("s3cret" in a for a in cmd), "no value on sbatch's command line"
    # a run that cannot name the worker's variables cannot re-enable --export=ALL either
    for args in (
        ["--export=ALL"],
        ["--export", "ALL"],
        ["--expo=ALL"],
        ["--export-file=/tmp/e"],
        ["--wrap=id"],
    ):
        with pytest.raises(ValueError, match=r"sbatch_args .* would override what the worker sets"):
            SlurmJobConfiguration(sbatch_args=args).sbatch_command()


def test_job_output_goes_to_a_private_log_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAMP_HOME", str(tmp_path / "stamp-home"))
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = SlurmJobConfiguration(working_dir=repo)
    logs = tmp_path / "stamp-home" / "slurm-logs"
    assert cfg.prepare_log_dir() == logs
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert f"--output={logs / 'slurm-%j.out'}" in cfg.sbatch_command()
    # an output_dir others can write is refused, with the folder named
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match=rf"output_dir {shared} of the stamp-slurm job is writable by group"):
        SlurmJobConfiguration(output_dir=shared).prepare_log_dir()
