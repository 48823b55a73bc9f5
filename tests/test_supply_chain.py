"""Supply chain (security review M9, M11): the README and CI install from a hashed lock, the lock covers
and satisfies pyproject, the images install from hashed locks, and no file adds a second package index."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT

DEV_LOCK = REPO_ROOT / "requirements" / "dev.lock"
IMAGE_LOCKS = REPO_ROOT / "containers" / "locks"
STAGES = ("preprocess", "modeling", "report")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})(?=\s|$)")
INSTALL = (
    "python3 -m venv .venv && .venv/bin/pip install -q --require-hashes -r requirements/dev.lock"
    " && .venv/bin/pip install -q --no-deps --no-build-isolation -e ."
)


def parse_lock(path: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """name -> (requirement, sha256 list) for each entry; fails on anything that is not `name==version ... --hash`."""
    entries: dict[str, tuple[Requirement, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r} (pins only)"
        spec, _, rest = line.partition("--hash=")
        req = Requirement(spec.strip())
        pins = list(req.specifier)
        assert len(pins) == 1 and pins[0].operator == "==" and "*" not in pins[0].version, (
            f"{path.name}: {req} is not pinned with =="
        )
        hashes = HASH.findall("--hash=" + rest) if rest else []
        assert hashes, f"{path.name}: {req} has no --hash=sha256:"
        assert len(hashes) == line.count("--hash="), f"{path.name}: {req} has a malformed or non-sha256 hash"
        assert not req.extras and not req.url, f"{path.name}: {req}: extras/URLs are not locked pins"
        name = canonicalize_name(req.name)
        if name in entries:  # a universal lock may pin one name per environment (markers)
            assert entries[name][0].marker != req.marker, f"{path.name}: {name} twice"
            if req.marker is None or not req.marker.evaluate():
                continue
        entries[name] = (req, hashes)
    assert entries, f"{path} has no entries"
    return entries


def pinned(req: Requirement) -> str:
    return next(iter(req.specifier)).version


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def dev_requirements() -> list[Requirement]:
    p = project()
    reqs = [*p["project"]["dependencies"], *p["project"]["optional-dependencies"]["dev"]]
    return [Requirement(r) for r in reqs + p["build-system"]["requires"]]


@pytest.fixture(scope="module")
def dev_lock() -> dict[str, tuple[Requirement, list[str]]]:
    return parse_lock(DEV_LOCK)


def test_every_lock_entry_is_pinned_and_hashed(dev_lock):
    locks = [DEV_LOCK, *sorted(IMAGE_LOCKS.glob("*.lock"))]
    assert len(locks) >= 5, locks
    for lock in locks[1:]:
        parse_lock(lock)
    assert sum(len(h) for _, h in dev_lock.values()) >= len(dev_lock)


def test_lock_parser_rejects_unpinned_and_unhashed(tmp_path):
    """The checks above can fail: a range, a missing hash and a md5 hash are each refused."""
    bad = {
        "range": "numpy>=2 \\\n    --hash=sha256:" + "a" * 64 + "\n",
        "nohash": "numpy==2.4.6\n",
        "md5": "numpy==2.4.6 \\\n    --hash=md5:" + "a" * 32 + "\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(AssertionError):
            parse_lock(tmp_path / name)


def test_lock_covers_and_satisfies_pyproject(dev_lock):
    for req in dev_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": "dev"}):
            continue
        name = canonicalize_name(req.name)
        assert name in dev_lock, (
            f"{req} (pyproject) is not in requirements/dev.lock: run requirements/lock.sh"
        )
        locked = pinned(dev_lock[name][0])
        assert req.specifier.contains(locked, prereleases=True), (
            f"dev.lock pins {name}=={locked}, outside pyproject's {req}: run requirements/lock.sh"
        )


def test_lock_prefect_is_the_deployments_version(dev_lock):
    declared = yaml.safe_load((REPO_ROOT / "deployments" / "prefect.yaml").read_text())["prefect-version"]
    assert pinned(dev_lock["prefect"][0]) == str(declared)
    assert pinned(parse_lock(IMAGE_LOCKS / "image.lock")["prefect"][0]) == str(declared)


def test_this_environment_is_the_lock(dev_lock):
    """The README/CI venv holds exactly the locked versions (a stale venv: reinstall with the README command)."""
    wrong = {}
    for name, (req, _) in dev_lock.items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(name)
        except PackageNotFoundError:
            have = None
        if have != pinned(req):
            wrong[name] = (have, pinned(req))
    assert not wrong, f"installed vs locked: {wrong}"


def test_readme_and_ci_install_from_the_hashed_lock():
    readme = (REPO_ROOT / "README.md").read_text()
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    test_cmd = f"{INSTALL} && .venv/bin/python -m pytest"
    assert test_cmd in readme.splitlines(), "README test command"
    assert test_cmd in ci.splitlines(), ".ci/run must run the README test command verbatim"
    demo = [line for line in readme.splitlines() if line.endswith("&& .venv/bin/stamp demo")]
    assert demo and all("--require-hashes -r requirements/dev.lock" in d for d in demo), demo
    assert "pip install -e '.[dev]' &&" not in readme and "pip install -q -e" not in ci


def test_no_file_adds_a_second_index():
    """An extra index lets the highest version found on ANY index win (dependency confusion)."""
    flag = "--extra" + "-index-url"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    hits = []
    for rel in filter(None, files):
        path = REPO_ROOT / rel.decode()
        if path.is_file() and flag.encode() in path.read_bytes():
            hits.append(rel.decode())
    assert not hits, f"{flag} in {hits}"


def _dockerfile(stage: str) -> str:
    return (REPO_ROOT / "containers" / f"{stage}.Dockerfile").read_text()


@pytest.mark.parametrize("stage", STAGES)
def test_images_install_from_hashed_locks(stage):
    text = _dockerfile(stage)
    installs = re.findall(r"\bpip install\b[^\n;&]*", text)
    assert installs, stage
    for cmd in installs:
        ok = (
            "--require-hashes" in cmd
            or "--no-deps --no-build-isolation /opt/stamp" in cmd
            or '--index-url "$TORCH_INDEX_URL"' in cmd
        )
        assert ok, f"{stage}: unhashed install: {cmd}"
    extras = re.search(r'^ARG STAMP_EXTRAS="([^"]*)"', text, re.M)[1]
    lock = IMAGE_LOCKS / (f"image-{extras.replace(',', '-')}.lock" if extras else "image.lock")
    assert lock.is_file(), f"{stage}: STAMP_EXTRAS={extras!r} needs {lock.name}"
    entries = parse_lock(lock)
    for extra in filter(None, extras.split(",")):
        for r in project()["project"]["optional-dependencies"][extra]:
            assert canonicalize_name(Requirement(r).name) in entries, f"{lock.name} misses {r} ([{extra}])"


def test_torch_specs_have_torch_locks():
    """Every TORCH_SPEC the Dockerfiles default to or build.sh passes has its hashed torch layer lock."""
    specs = {re.search(r'^ARG TORCH_SPEC="([^"]+)"', _dockerfile(s), re.M)[1] for s in STAGES}
    specs |= set(re.findall(r'TORCH_SPEC=([^"]+)"', (REPO_ROOT / "containers" / "build.sh").read_text()))
    assert len(specs) >= 2, specs
    for spec in specs:
        reqs = [Requirement(r) for r in spec.split()]
        torch_version = pinned(reqs[0]).split("+")[0]
        lock = parse_lock(IMAGE_LOCKS / f"torch-{torch_version}.lock")
        for r in reqs:
            locked = pinned(lock[canonicalize_name(r.name)][0])
            assert locked.split("+")[0] == pinned(r), (
                f"torch-{torch_version}.lock pins {r.name}=={locked}, not {r}"
            )


def test_image_locks_agree_with_dev_lock(dev_lock):
    """The images run the versions the tests ran (only the torch layer and the encoder extras differ)."""
    dev_torch = pinned(dev_lock["torch"][0])
    for lock in sorted(IMAGE_LOCKS.glob("*.lock")):
        other_torch = lock.name.startswith("torch-") and lock.name != f"torch-{dev_torch}.lock"
        for name, (req, _) in parse_lock(lock).items():
            if other_torch and name in ("torch", "torchvision"):
                continue
            if name in dev_lock:
                assert pinned(req) == pinned(dev_lock[name][0]), f"{lock.name}: {name}"
