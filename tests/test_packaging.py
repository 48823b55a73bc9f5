"""Every Python package in the source tree is shipped by pyproject.toml (not only by the editable install)."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO_ROOT


def test_all_packages_declared() -> None:
    cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO_ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found <= declared, f"packages missing from pyproject.toml: {sorted(found - declared)}"
