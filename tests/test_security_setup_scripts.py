"""Security of the root setup scripts (review finding M10): a state dir others could have planted or can write
is refused with one line, files are never written through a planted symlink, and only PIDs that are plain
numbers > 1 of the expected daemon are ever signalled.

podman-setup.sh / build.sh run with stub ``podman``/builder commands (nothing real is started). The SLURM
scripts need root: they run in a throw-away PID, mount and network namespace (``unshare``), with tmpfs over
``/etc/slurm`` and ``/run/munge``, so even a script that does not refuse cannot touch the host's SLURM or
signal a process outside the namespace.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PODMAN_SETUP = REPO_ROOT / "containers" / "podman-setup.sh"
BUILD = REPO_ROOT / "containers" / "build.sh"
SLURM_UP = REPO_ROOT / "deployments" / "slurm" / "slurm-up.sh"
SLURM_DOWN = REPO_ROOT / "deployments" / "slurm" / "slurm-down.sh"
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
case "$(basename "$0") $1" in
  "apt-get "*) exit 1 ;;
  "podman --version") echo "podman version 0.0.0" ;;
  "builder image") exit 1 ;;
esac
exit 0
"""


def _stubs(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose podman, buildah, runc, debootstrap, apt-get and builder only log their call."""
    bin_dir, log = tmp_path / "stub-bin", tmp_path / "stub-calls.log"
    bin_dir.mkdir()
    log.touch()
    for name in ("podman", "buildah", "runc", "debootstrap", "apt-get", "builder"):
        (bin_dir / name).write_text(STUB.format(log=log))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "STAMP_PODMAN_STATE", "STAMP_SLURM_STATE"):
        env.pop(key, None)
    return env, log


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def _unsafe_state(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A state dir a local attacker could control, and the words the refusal must contain."""
    if kind == "world-writable":
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o777)
        return state, f"{state} is writable by group or others (mode 0777)"
    if kind == "group-writable":
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o770)
        return state, f"{state} is writable by group or others (mode 0770)"
    if kind == "symlink":
        target = _private_dir(tmp_path / "elsewhere")
        state = tmp_path / "state"
        state.symlink_to(target)
        return state, f"{state} is a symbolic link"
    if kind == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("planting a folder owned by someone else needs root (chown)")
        state = _private_dir(tmp_path / "state")
        os.chown(state, 65534, 65534)
        return state, f"{state} is owned by uid 65534, not by uid 0"
    if kind == "open-parent":
        parent = tmp_path / "open"
        parent.mkdir()
        parent.chmod(0o777)
        state = _private_dir(parent / "state")
        return state, f"{parent} is writable by group or others (mode 0777)"
    raise AssertionError(kind)


UNSAFE_KINDS = ["world-writable", "group-writable", "symlink", "other-owner", "open-parent"]


def _assert_refused(run: subprocess.CompletedProcess, words: str, var: str) -> None:
    assert run.returncode != 0, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and words in errors[0] and var in errors[0], run.stderr


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


# --------------------------------------------------------------------------- podman-setup.sh, build.sh


@pytest.mark.parametrize("kind", UNSAFE_KINDS)
def test_podman_setup_refuses_a_state_dir_others_control(tmp_path: Path, kind: str) -> None:
    env, log = _stubs(tmp_path)
    state, words = _unsafe_state(tmp_path, kind)
    before = _files_under(state)
    run = subprocess.run(
        ["bash", str(PODMAN_SETUP)],
        env={**env, "STAMP_PODMAN_STATE": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_refused(run, words, "STAMP_PODMAN_STATE")
    assert _files_under(state) == before, "nothing written into the planted folder"
    assert log.read_text() == "", "podman/apt-get never ran"
    assert "export" not in run.stdout


def test_podman_setup_makes_a_private_state_dir_and_replaces_a_planted_symlink(tmp_path: Path) -> None:
    env, _ = _stubs(tmp_path)
    fresh = tmp_path / "new-state"
    run = subprocess.run(
        ["bash", str(PODMAN_SETUP)],
        env={**env, "STAMP_PODMAN_STATE": str(fresh)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert f"CONTAINERS_CONF={fresh}/containers.conf" in run.stdout
    # a symlink left in the state dir is replaced by the file, its target is not written through
    victim = tmp_path / "victim"
    victim.write_text("do not touch\n")
    (fresh / "containers.conf").unlink()
    (fresh / "containers.conf").symlink_to(victim)
    (fresh / "storage.conf").unlink()
    (fresh / "storage.conf").symlink_to(victim)
    run = subprocess.run(
        ["bash", str(PODMAN_SETUP)],
        env={**env, "STAMP_PODMAN_STATE": str(fresh)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert victim.read_text() == "do not touch\n"
    for name in ("containers.conf", "storage.conf"):
        conf = fresh / name
        assert not conf.is_symlink() and stat.S_IMODE(conf.stat().st_mode) == 0o644
    assert 'runtime = "runc"' in (fresh / "containers.conf").read_text()
    assert f'graphroot = "{fresh}/store-' in (fresh / "storage.conf").read_text()


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "open-parent"])
def test_build_refuses_a_planted_base_image_tar(tmp_path: Path, kind: str) -> None:
    """build.sh imports $STAMP_PODMAN_STATE/base/*.tar as the CPU base image: never from a folder others control."""
    env, log = _stubs(tmp_path)
    state, words = _unsafe_state(tmp_path, kind)
    base = state / "base"
    base.mkdir()
    (base / "debian-bookworm-minbase.tar").write_bytes(b"planted rootfs")
    run = subprocess.run(
        ["bash", str(BUILD), "base"],
        env={
            **env,
            "STAMP_PODMAN_STATE": str(state),
            "STAMP_BUILDER": str(tmp_path / "stub-bin" / "builder"),
            "CONTAINERS_CONF": "/dev/null",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    _assert_refused(run, words, "STAMP_PODMAN_STATE")
    assert "import" not in log.read_text(), log.read_text()


# --------------------------------------------------------------------------- slurm-up.sh, slurm-down.sh

SANDBOX_SETUP = (
    # a host without SLURM has no /etc/slurm to cover: an empty mount point is made for the tmpfs
    "mkdir -p /etc/slurm && mount -t tmpfs tmpfs /etc/slurm && mkdir -p /run/munge "
    "&& mount -t tmpfs tmpfs /run/munge || exit 90; "
)


def _sandboxed(script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``bash -c script`` as PID 1 of fresh PID, mount and network namespaces and in a new session, so
    that neither ``kill -1`` (PID namespace) nor ``kill 0`` (process group) reaches a process outside."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setsid")):
        pytest.skip(
            "the SLURM scripts run as root: needs root, unshare and setsid for a throw-away namespace"
        )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--pid",
            "--net",
            "--fork",
            "--mount-proc",
            "setsid",
            "bash",
            "-c",
            SANDBOX_SETUP + script,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("kind", UNSAFE_KINDS)
def test_slurm_up_refuses_a_state_dir_others_control(tmp_path: Path, kind: str) -> None:
    env, log = _stubs(tmp_path)
    state, words = _unsafe_state(tmp_path, kind)
    before = _files_under(state)
    run = _sandboxed(f"exec bash {SLURM_UP}", {**env, "STAMP_SLURM_STATE": str(state)})
    _assert_refused(run, words, "STAMP_SLURM_STATE")
    assert _files_under(state) == before, "no slurm.conf, spool or log written into the planted folder"


CANARY = """
sleep 300 & canary=$!
[ -z "$CANARY_PIDFILE" ] || echo "$canary" > "$CANARY_PIDFILE"
bash {down}; echo "down-rc=$?"
kill -0 "$canary" 2>/dev/null && echo CANARY_ALIVE
"""


@pytest.mark.parametrize("content", ["-1", "1", "0", "-1234", "12 -1", "abc", "$(id)"])
def test_slurm_down_signals_no_pid_that_is_not_a_plain_number_above_1(tmp_path: Path, content: str) -> None:
    env, _ = _stubs(tmp_path)
    state = _private_dir(tmp_path / "state")
    (state / "slurmd.pid").write_text(content + "\n")
    run = _sandboxed(CANARY.format(down=SLURM_DOWN), {**env, "STAMP_SLURM_STATE": str(state)})
    assert "CANARY_ALIVE" in run.stdout, run.stdout + run.stderr
    assert "down-rc=1" in run.stdout, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"{state}/slurmd.pid" in errors[0] and "not a PID" in errors[0], run.stderr


def test_slurm_down_leaves_a_pid_that_is_not_its_daemon_alone(tmp_path: Path) -> None:
    """A recycled or forged PID (here: a `sleep`) in slurmd.pid is not slurmd: nothing is signalled."""
    env, _ = _stubs(tmp_path)
    state = _private_dir(tmp_path / "state")
    pidfile = state / "slurmd.pid"
    run = _sandboxed(
        CANARY.format(down=SLURM_DOWN),
        {**env, "STAMP_SLURM_STATE": str(state), "CANARY_PIDFILE": str(pidfile)},
    )
    assert "CANARY_ALIVE" in run.stdout, run.stdout + run.stderr
    assert "is not slurmd" in run.stderr and "down-rc=0" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("kind", ["world-writable", "symlink", "open-parent"])
def test_slurm_down_refuses_a_state_dir_others_control(tmp_path: Path, kind: str) -> None:
    """A planted state dir's pidfile naming some process (here the canary) never gets it killed."""
    env, _ = _stubs(tmp_path)
    state, words = _unsafe_state(tmp_path, kind)
    run = _sandboxed(
        CANARY.format(down=SLURM_DOWN),
        {**env, "STAMP_SLURM_STATE": str(state), "CANARY_PIDFILE": str(state / "slurmctld.pid")},
    )
    assert "CANARY_ALIVE" in run.stdout, run.stdout + run.stderr
    assert "down-rc=1" in run.stdout
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and words in errors[0] and "STAMP_SLURM_STATE" in errors[0], run.stderr


def test_scripts_parse() -> None:
    for script in (
        PODMAN_SETUP,
        BUILD,
        SLURM_UP,
        SLURM_DOWN,
        REPO_ROOT / "deployments" / "lib" / "state-dir.sh",
    ):
        subprocess.run(["bash", "-n", str(script)], check=True)
