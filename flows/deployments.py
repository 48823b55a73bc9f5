"""``stamp deploy-flows``: create the work pools and register the deployments of ``deployments/``.

* ``deployments/work-pools.yaml`` names the pools (``stamp-process``, ``stamp-docker``, ``stamp-slurm`` —
  the last one of our sbatch worker's type, :mod:`stamp_flows.slurm_worker`), their worker type and defaults for that worker's job variables. A pool's base job template is the
  worker's own default template with those defaults written in (:func:`base_job_template`).
* ``deployments/prefect.yaml`` holds one deployment per stage and pool plus ``cohort/process`` (with the
  ``stamp.cohort.ready`` trigger) and ``watch/process``. Registration runs Prefect's own
  ``prefect --no-prompt deploy --all`` in a subprocess from the repository root (entrypoints are relative
  to it), after checking every deployment's job variables against its pool's template here, so a typo or
  a wrong type is refused with one line naming the deployment and the variable.

Registering needs a Prefect server (``PREFECT_API_URL`` or ``stamp server``): workers and triggers only
work against a server that keeps running.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS_DIR = REPO_ROOT / "deployments"
PREFECT_YAML = DEPLOYMENTS_DIR / "prefect.yaml"
WORK_POOLS_YAML = DEPLOYMENTS_DIR / "work-pools.yaml"


class DeploymentError(RuntimeError):
    """A pool or deployment definition is wrong, or registering it failed (one-line message)."""


@dataclass(frozen=True)
class PoolSpec:
    """One work pool of ``work-pools.yaml``: what is fixed, what a run may choose, within which limits."""

    name: str
    type: str
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    concurrency_limit: int | None = None


def _fill_root(value: Any, root: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{project_root}", str(root))
    if isinstance(value, list):
        return [_fill_root(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _fill_root(v, root) for k, v in value.items()}
    return value


def load_pool_specs(path: Path | None = None, project_root: Path | None = None) -> dict[str, PoolSpec]:
    """The pools of ``work-pools.yaml`` (``{project_root}`` filled in), by name."""
    path = Path(path or WORK_POOLS_YAML)
    root = Path(project_root or REPO_ROOT).resolve()
    data = yaml.safe_load(path.read_text()) or {}
    pools = data.get("pools")
    if not isinstance(pools, dict) or not pools:
        raise DeploymentError(f"{path}: expected a non-empty mapping 'pools: {{name: {{type: ...}}}}'")
    specs = {}
    for name, spec in pools.items():
        if not isinstance(spec, dict) or not spec.get("type"):
            raise DeploymentError(f"{path}: pool '{name}' needs a 'type' (process, docker or slurm)")
        specs[name] = PoolSpec(
            name,
            spec["type"],
            spec.get("description", ""),
            defaults=_fill_root(spec.get("defaults") or {}, root),
            fixed=_fill_root(spec.get("fixed") or {}, root),
            variables=spec.get("variables") or {},
            limits=spec.get("limits") or {},
            concurrency_limit=spec.get("concurrency_limit"),
        )
    return specs


def default_base_job_template(pool_type: str) -> dict[str, Any]:
    """The worker's own default base job template for ``pool_type`` (its package must be installed)."""
    from prefect.workers.base import BaseWorker

    if pool_type == "stamp-slurm":  # our sbatch worker registers its type on import
        import stamp_flows.slurm_worker  # noqa: F401
    cls = BaseWorker.get_worker_class_from_type(pool_type)
    if cls is None:
        extra = {"docker": "prefect-docker", "slurm": "prefect-slurm"}.get(pool_type, f"prefect-{pool_type}")
        raise DeploymentError(f"no worker for pool type '{pool_type}'; pip install {extra}")
    return copy.deepcopy(cls.get_default_base_job_template())


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    return set()


def base_job_template(spec: PoolSpec) -> dict[str, Any]:
    """``spec``'s base job template: the worker default with ``spec.fixed`` written into the job
    configuration (no longer a job variable), ``spec.variables`` added, ``spec.limits`` applied,
    ``spec.defaults`` as variable defaults, and no job variable beyond these accepted by the server.
    """
    template = default_base_job_template(spec.type)
    config = template["job_configuration"]
    variables = template["variables"]
    props = variables.setdefault("properties", {})
    where = f"work pool '{spec.name}'"
    for key, value in spec.fixed.items():
        if key not in config:
            raise DeploymentError(
                f"{where}: fixed '{key}' is not part of a {spec.type} job; known: {sorted(config)}"
            )
        config[key] = copy.deepcopy(value)
        props.pop(key, None)
    for key, schema in spec.variables.items():
        if key in props:
            raise DeploymentError(f"{where}: variable '{key}' exists already; constrain it under 'limits'")
        props[key] = copy.deepcopy(schema)
    for key, extra in spec.limits.items():
        if key not in props:
            raise DeploymentError(f"{where}: limits for '{key}', which is not a job variable of this pool")
        props[key].update(copy.deepcopy(extra))
    variables["required"] = [r for r in variables.get("required", []) if r in props]
    variables["additionalProperties"] = False  # the server refuses any other job variable
    undeclared = _placeholders(config) - set(props)
    if undeclared:
        raise DeploymentError(
            f"{where}: the job configuration uses undeclared variable(s) {sorted(undeclared)}"
        )
    validate_job_variables(template, spec.defaults, where)
    for key, value in spec.defaults.items():
        props[key]["default"] = copy.deepcopy(value)
    return template


def validate_job_variables(template: dict[str, Any], job_variables: dict[str, Any], where: str) -> None:
    """Refuse a job variable the template does not declare or whose value breaks its schema."""
    from jsonschema import Draft202012Validator

    variables = template["variables"]
    props = variables.get("properties", {})
    for key, value in (job_variables or {}).items():
        if key not in props:
            raise DeploymentError(
                f"{where}: '{key}' is not a job variable of this pool; known: {', '.join(sorted(props))}"
            )
        schema = {**props[key], "$defs": variables.get("$defs", variables.get("definitions", {}))}
        error = next(iter(Draft202012Validator(schema).iter_errors(value)), None)
        if error is not None:
            raise DeploymentError(f"{where}: job variable '{key}' = {value!r} is refused: {error.message}")


def load_deployment_specs(prefect_yaml: Path | None = None) -> list[dict[str, Any]]:
    """The ``deployments:`` entries of a prefect.yaml (YAML anchors resolved)."""
    path = Path(prefect_yaml or PREFECT_YAML)
    data = yaml.safe_load(path.read_text()) or {}
    deployments = data.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise DeploymentError(f"{path}: no 'deployments:' list")
    return deployments


def flow_name(entrypoint: str, project_root: Path | None = None) -> str:
    """The flow name behind ``path/to/file.py:function`` (read statically, like ``prefect deploy``)."""
    file, func = entrypoint.rsplit(":", 1)
    path = Path(project_root or REPO_ROOT) / file
    if not path.is_file():
        raise DeploymentError(f"entrypoint {entrypoint}: {path} does not exist")
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call):
                    for kw in deco.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return str(kw.value.value)
            return func.replace("_", "-")
    raise DeploymentError(f"entrypoint {entrypoint}: no function '{func}' in {path}")


def _select_pools(specs: dict[str, PoolSpec], pools: list[str] | None) -> list[str]:
    if not pools:
        return list(specs)
    by_type = {s.type: n for n, s in specs.items()}
    names = [p if p in specs else by_type.get(p, p) for p in pools]
    unknown = [p for p in names if p not in specs]
    if unknown:
        raise DeploymentError(f"unknown work pool(s) {unknown}; choose from {list(specs)} or their types")
    return names


def planned_deployments(
    prefect_yaml: Path | None = None,
    pools: list[str] | None = None,
    *,
    work_pools_yaml: Path | None = None,
    project_root: Path | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(flow/deployment name, entry)`` for the deployments on ``pools``, job variables checked."""
    root = Path(project_root or REPO_ROOT)
    specs = load_pool_specs(work_pools_yaml, root)
    selected = _select_pools(specs, pools)
    templates: dict[str, dict[str, Any]] = {}
    planned = []
    for entry in load_deployment_specs(prefect_yaml):
        pool = (entry.get("work_pool") or {}).get("name")
        if pool not in specs:
            raise DeploymentError(
                f"deployment '{entry.get('name')}' ({entry.get('entrypoint')}): pool {pool!r} is not in work-pools.yaml"
            )
        if pool not in selected:
            continue
        name = f"{flow_name(entry['entrypoint'], root)}/{entry['name']}"
        if pool not in templates:
            templates[pool] = base_job_template(specs[pool])
        job_vars = entry["work_pool"].get("job_variables") or {}
        validate_job_variables(templates[pool], job_vars, f"deployment '{name}' (pool {pool})")
        planned.append((name, entry))
    return planned


def _api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise DeploymentError(
            "registering deployments needs a Prefect server: start one with `stamp server --background` "
            "or set PREFECT_API_URL"
        )
    return str(url)


def ensure_work_pools(
    pools: list[str] | None = None, *, work_pools_yaml: Path | None = None, project_root: Path | None = None
) -> list[str]:
    """Create the pools of ``work-pools.yaml`` (or only ``pools``), or bring existing ones to it.

    An existing pool of that name gets this base job template and concurrency limit: a pool left
    with an older, looser template would let runs choose what ``fixed`` forbids. Returns the pools
    created or changed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    specs = load_pool_specs(work_pools_yaml, project_root)
    changed = []
    with get_client(sync_client=True) as client:
        for name in _select_pools(specs, pools):
            spec = specs[name]
            template = base_job_template(spec)
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=spec.type,
                        description=spec.description,
                        base_job_template=template,
                        concurrency_limit=spec.concurrency_limit,
                    )
                )
                changed.append(name)
                continue
            except ObjectAlreadyExists:
                pass
            existing = client.read_work_pool(name)
            if existing.type != spec.type:
                raise DeploymentError(
                    f"work pool '{name}' exists with type '{existing.type}', not '{spec.type}': "
                    f"delete it (`prefect work-pool delete {name}`) or rename it in work-pools.yaml"
                )
            if (existing.base_job_template, existing.concurrency_limit) != (template, spec.concurrency_limit):
                client.update_work_pool(
                    name,
                    WorkPoolUpdate(
                        base_job_template=template,
                        concurrency_limit=spec.concurrency_limit,
                        description=spec.description,
                    ),
                )
                changed.append(name)
    return changed


ZOMBIE_AUTOMATION = "stamp-crash-runs-without-heartbeats"


def ensure_zombie_automation(silent_for_s: float = 300.0) -> bool:
    """Install the automation that marks a flow run Crashed when its heartbeats stop; True if created.

    A run whose worker, container or SLURM job died (walltime, node loss, ``kill -9``) stays Running
    for ever on a self-hosted server otherwise. Flow runs on our pools beat every 60 s
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in work-pools.yaml); ``silent_for_s`` is how long a run
    may stay silent before it is marked Crashed.
    """
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if any(a.name == ZOMBIE_AUTOMATION for a in client.read_automations()):
            return False
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that stops sending heartbeats (its process or node died) is marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_for_s),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                force=False,
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent_for_s:.0f} s: its process, container or job died",
            )
        ],
    ).create()
    return True


def register_deployments(
    prefect_yaml: Path | None = None,
    pools: list[str] | None = None,
    *,
    work_pools_yaml: Path | None = None,
    project_root: Path | None = None,
    timeout: float = 600.0,
) -> list[str]:
    """``stamp deploy-flows``: create or update the work pools, install the zombie-run automation and
    register the Prefect deployments on ``pools`` (default: all). (Not ``deploy``: that is STAMP's
    command that runs a trained model on a cohort, :func:`stamp_flows.modeling.deploy_flow`.)

    ``pools`` takes pool names or types (``process``, ``docker``, ``slurm``). Returns the registered
    deployments' full names (``flow/deployment``), read back from the server.
    """
    root = Path(project_root or REPO_ROOT).resolve()
    api_url = _api_url()
    planned = planned_deployments(prefect_yaml, pools, work_pools_yaml=work_pools_yaml, project_root=root)
    if not planned:
        return []
    used_pools = sorted({entry["work_pool"]["name"] for _, entry in planned})
    ensure_work_pools(used_pools, work_pools_yaml=work_pools_yaml, project_root=root)
    ensure_zombie_automation()
    source = yaml.safe_load(Path(prefect_yaml or PREFECT_YAML).read_text())
    source.pop("definitions", None)
    source["deployments"] = [entry for _, entry in planned]
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_CLI_PROMPT": "false", "DO_NOT_TRACK": "1"}
    with tempfile.TemporaryDirectory(prefix="stamp-deploy-") as tmp:
        selected = Path(tmp) / "prefect.yaml"
        selected.write_text(yaml.safe_dump(source, sort_keys=False))
        cmd = [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(selected),
        ]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = " | ".join(
            line.strip() for line in (proc.stdout + proc.stderr).splitlines()[-6:] if line.strip()
        )
        raise DeploymentError(f"prefect deploy failed (exit {proc.returncode}): {tail}")
    return _read_back([name for name, _ in planned])


def _read_back(names: list[str]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                missing.append(name)
    if missing:
        raise DeploymentError(f"prefect deploy finished but the server has no deployment(s) {missing}")
    return names


def worker_command(
    pool: str, extra: list[str] | None = None, *, work_pools_yaml: Path | None = None
) -> list[str]:
    """The argv that starts a worker polling ``pool`` (its type from ``work-pools.yaml``)."""
    specs = load_pool_specs(work_pools_yaml)
    if pool not in specs:
        raise DeploymentError(f"unknown work pool '{pool}'; the pools of work-pools.yaml are {sorted(specs)}")
    spec = specs[pool]
    if spec.type == "stamp-slurm":
        return [sys.executable, "-m", "stamp_flows.slurm_worker", "start", "--pool", pool, *(extra or [])]
    return [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        spec.type,
        *(extra or []),
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m stamp_flows.deployments [template POOL | deploy [POOL...]]``."""
    import json

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["template"] and len(args) == 2:
        print(json.dumps(base_job_template(load_pool_specs()[args[1]]), indent=2))
        return 0
    if args[:1] == ["deploy"]:
        for name in register_deployments(pools=args[1:] or None):
            print(name)
        return 0
    print("usage: python -m stamp_flows.deployments template POOL | deploy [POOL ...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
