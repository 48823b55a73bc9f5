"""Import layering: ``stamp_flows → stamp_tasks → stamp``, checked on the source (AST), not by importing.

* ``stamp`` (the library) never imports ``prefect``, ``stamp_flows`` or ``stamp_tasks``, except the CLI
  entry modules (:data:`CLI_MODULES`), which may import ``stamp_flows``, and only inside functions (so
  ``import stamp.cli`` stays free of Prefect and ``stamp --help`` fast);
* ``stamp_tasks`` never imports ``stamp_flows``.

Every import counts: module level, inside functions, ``importlib.import_module("…")`` and
``__import__("…")`` with a literal name, relative imports resolved against the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: import name -> source folder (pyproject's ``package-dir``)
PACKAGES = {
    "stamp": REPO_ROOT / "stamp",
    "stamp_tasks": REPO_ROOT / "tasks",
    "stamp_flows": REPO_ROOT / "flows",
}
#: the one way from the library to the orchestration: the CLI front
CLI_MODULES = frozenset({"stamp.cli", "stamp.cli_support", "stamp.cli_stages"})


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the absolute module name imported
    line: int
    deferred: bool  # inside a function (runs on call, not on import)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (the text of ``module``), with relative names made absolute."""
    tree = ast.parse(source)
    found: list[Import] = []
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, deferred) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = base.split(".")
                    anchor = ".".join(parts[: len(parts) - (child.level - 1)])
                    target = f"{anchor}.{child.module}" if child.module else anchor
                else:
                    target = child.module or ""
                found.append(Import(module, target, child.lineno, deferred))
                # ``from pkg import sub`` may import the submodule pkg.sub
                found.extend(
                    Import(module, f"{target}.{a.name}", child.lineno, deferred) for a in child.names
                )
            elif isinstance(child, ast.Call) and _dynamic_import_name(child):
                found.append(Import(module, _dynamic_import_name(child) or "", child.lineno, deferred))
            visit(child, inner)

    visit(tree, False)
    return found


def _dynamic_import_name(call: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def package_imports(name: str, folder: Path) -> list[Import]:
    """Every import of every module of the package ``name`` whose sources are in ``folder``."""
    found: list[Import] = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("").parts
        is_package = rel[-1] == "__init__"
        module = ".".join((name, *rel[:-1]) if is_package else (name, *rel))
        found += imports_of(path.read_text(encoding="utf-8"), module, is_package)
    return found


def _hits(target: str, forbidden: Iterable[str]) -> str | None:
    return next((f for f in forbidden if target == f or target.startswith(f + ".")), None)


def layering_violations(
    imports: Iterable[Import],
    forbidden: Iterable[str],
    allowed: Mapping[str, frozenset[str]] | None = None,
) -> list[str]:
    """Imports of a ``forbidden`` package, as ``module:line imports target`` lines.

    ``allowed`` maps a module to the forbidden packages it may import, inside functions only.
    """
    forbidden, allowed = tuple(forbidden), allowed or {}
    out = []
    seen: set[tuple[str, int]] = set()
    for imp in sorted(imports, key=lambda i: len(i.target)):  # one line per import statement
        if (imp.module, imp.line) in seen:
            continue
        hit = _hits(imp.target, forbidden)
        if hit is None:
            continue
        seen.add((imp.module, imp.line))
        if hit in allowed.get(imp.module, frozenset()):
            if imp.deferred:
                continue
            out.append(
                f"{imp.module}:{imp.line} imports {imp.target} at module level (import it inside the function)"
            )
        else:
            out.append(f"{imp.module}:{imp.line} imports {imp.target}")
    return sorted(set(out))


def _library_rules() -> tuple[tuple[str, ...], dict[str, frozenset[str]]]:
    return ("prefect", "stamp_flows", "stamp_tasks"), dict.fromkeys(CLI_MODULES, frozenset({"stamp_flows"}))


# --------------------------------------------------------------------------- the tree as it is


def test_library_never_imports_the_orchestration() -> None:
    forbidden, allowed = _library_rules()
    problems = layering_violations(package_imports("stamp", PACKAGES["stamp"]), forbidden, allowed)
    assert not problems, "stamp must not import Prefect or the flows/tasks:\n" + "\n".join(problems)


def test_cli_modules_exist_and_are_the_only_way_to_the_flows() -> None:
    imports = package_imports("stamp", PACKAGES["stamp"])
    modules = {imp.module for imp in imports}
    assert modules >= CLI_MODULES, (
        f"missing CLI modules: {sorted(CLI_MODULES - modules)} (update CLI_MODULES)"
    )
    # every module allowed to reach the flows does: the allow-list stays exact
    reaching = {imp.module for imp in imports if _hits(imp.target, ["stamp_flows"])}
    assert reaching == CLI_MODULES, f"modules importing stamp_flows: {sorted(reaching)}"


def test_tasks_never_import_flows() -> None:
    problems = layering_violations(package_imports("stamp_tasks", PACKAGES["stamp_tasks"]), ["stamp_flows"])
    assert not problems, "stamp_tasks must not import stamp_flows:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker catches violations


@pytest.mark.parametrize(
    "source",
    [
        "import prefect\n",
        "from prefect.artifacts import create_markdown_artifact\n",
        "def f():\n    from stamp_flows.cohort import cohort_flow\n",
        "from stamp_tasks import synth\n",
        "import importlib\nmod = importlib.import_module('stamp_flows.demo')\n",
        "class A:\n    def run(self):\n        __import__('prefect')\n",
    ],
)
def test_a_planted_library_violation_is_reported(source: str) -> None:
    forbidden, allowed = _library_rules()
    problems = layering_violations(imports_of(source, "stamp.planted"), forbidden, allowed)
    assert len(problems) == 1 and problems[0].startswith("stamp.planted:"), problems


def test_the_cli_exception_is_deferred_imports_of_the_flows_only() -> None:
    forbidden, allowed = _library_rules()
    deferred = "def main():\n    from stamp_flows.cohort import cohort_flow\n"
    assert layering_violations(imports_of(deferred, "stamp.cli"), forbidden, allowed) == []
    top = "from stamp_flows.cohort import cohort_flow\n"
    assert "at module level" in layering_violations(imports_of(top, "stamp.cli"), forbidden, allowed)[0]
    prefect = "def main():\n    import prefect\n"
    assert layering_violations(imports_of(prefect, "stamp.cli"), forbidden, allowed) == [
        "stamp.cli:2 imports prefect"
    ]


def test_relative_imports_resolve_and_a_planted_tree_fails(tmp_path: Path) -> None:
    lib, tasks = tmp_path / "lib", tmp_path / "tasks"
    (lib / "sub").mkdir(parents=True)
    tasks.mkdir()
    (lib / "__init__.py").write_text("")
    (lib / "sub" / "__init__.py").write_text("from .. import helpers\n")
    (lib / "sub" / "leaf.py").write_text("from . import sibling\n\n\ndef f():\n    import prefect.flows\n")
    (tasks / "t.py").write_text("from stamp_flows.cohort import cohort_flow\n")
    imports = package_imports("stamp", lib)
    assert {"stamp.helpers", "stamp.sub.sibling"} <= {imp.target for imp in imports}
    forbidden, allowed = _library_rules()
    assert layering_violations(imports, forbidden, allowed) == ["stamp.sub.leaf:5 imports prefect.flows"]
    assert layering_violations(package_imports("stamp_tasks", tasks), ["stamp_flows"]) == [
        "stamp_tasks.t:1 imports stamp_flows.cohort"
    ]
