"""Dependency floors the security review requires (M11) stay in pyproject.toml, and this environment meets them."""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

#: package -> the lowest release without the known vulnerabilities (security review M11)
FLOORS = {
    "torch": "2.10",  # torch.load(weights_only=True) bypasses: CVE-2025-32434, CVE-2026-24747
    "torchvision": "0.25",  # the torchvision matching torch 2.10
    "filelock": "3.20.3",  # symlink TOCTOU: CVE-2025-68146, CVE-2026-22701
    "pillow": "10.3",  # libwebp / ImageMath
    "transformers": "4.48",  # deserialization fixes (plip / titan extras)
}


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    out: dict[str, list[Requirement]] = {}
    for r in reqs:
        out.setdefault(r.name.lower(), []).append(r)
    return out


@pytest.mark.parametrize("name,floor", sorted(FLOORS.items()))
def test_pyproject_excludes_releases_below_the_floor(name, floor):
    reqs = _requirements()[name]
    below = Version(floor).release[:-1] + (Version(floor).release[-1] - 1,)
    just_below = ".".join(map(str, below)) if below[-1] >= 0 else None
    for r in reqs:
        assert r.specifier.contains(floor), f"{r} must allow {floor}"
        if just_below is not None:
            assert not r.specifier.contains(just_below), f"{r} allows {just_below}, below the floor {floor}"


def test_prefect_is_pinned_to_the_deployments_version():
    import yaml

    declared = yaml.safe_load((PYPROJECT.parent / "deployments" / "prefect.yaml").read_text())[
        "prefect-version"
    ]
    (req,) = _requirements()["prefect"]
    assert str(req.specifier) == f"=={declared}"


@pytest.mark.parametrize("name", ["torch", "torchvision", "filelock", "pillow", "transformers", "prefect"])
def test_installed_versions_meet_pyproject(name):
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.skip(f"{name} is not installed (an optional extra)")
    for r in _requirements()[name]:
        assert r.specifier.contains(Version(installed).base_version, prereleases=True), (
            f"installed {name} {installed} does not satisfy {r}: reinstall with pip install -e ."
        )
