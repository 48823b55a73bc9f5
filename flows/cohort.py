"""``stamp run``: the ``cohort`` flow — every configured stage of one config, in STAMP's order.

preprocess → (encode_slides / encode_patients) → crossval or train → deploy → statistics →
heatmaps. A stage runs when its section is in the config (``crossval`` wins over ``training``
when both are there; ``stages=[...]`` picks stages explicitly). Each stage is a subflow whose
tasks are cached on content (DESIGN contract 4), so an unchanged stage is served from the cache.

A stage listed in ``orchestration.deployments`` runs as that Prefect deployment
(``run_deployment``) instead of in-process — on the deployment's work pool (Docker, SLURM, …);
preprocessing is split over ``orchestration.preprocess_shards`` such runs. Stages exchange only
paths (the config's folders), never arrays.

A cohort from ``stamp watch`` runs the watcher's snapshot of its config (exact bytes, checked against the
sha256 in the event) confined to the cohort's folders (:mod:`stamp.confinement`): every path is checked
before any stage runs, and table entries again while the stages read them.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from stamp.config import load_config
from stamp.config_models import StampConfig
from stamp.confinement import check_tables, enforced, load_snapshot
from stamp.escaping import markdown_cell, markdown_code
from stamp.logs import logger
from stamp.stages import STAGE_BY_NAME, STAGES
from stamp_flows import logfilters
from stamp_flows.phi import REDACT_TAG, redacting, redaction_scope

logfilters.install()


class StageFailed(RuntimeError):
    """A stage of the cohort flow did not complete (the message names the stage and why)."""


def stage_plan(cfg: StampConfig, stages: list[str] | None = None) -> list[str]:
    """The stages the cohort flow runs for ``cfg``, in order.

    Without ``stages``: every stage whose section is present, except ``train`` when ``crossval``
    is present too. With ``stages``: exactly those (each needs its section).
    """
    if stages:
        unknown = [s for s in stages if s not in STAGE_BY_NAME]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGE_BY_NAME)}")
        missing = [s for s in stages if getattr(cfg, STAGE_BY_NAME[s].section) is None]
        if missing:
            names = ", ".join(f"{s} (section '{STAGE_BY_NAME[s].section}')" for s in missing)
            raise ValueError(f"the config has no section for stage(s) {names}; add it or drop the stage")
        return [s.name for s in STAGES if s.name in stages]
    plan = [s.name for s in STAGES if getattr(cfg, s.section) is not None]
    if "crossval" in plan and "train" in plan:
        plan.remove("train")
    return plan


def stage_parameters(stage: str, cfg: StampConfig) -> dict[str, Any]:
    """The stage flow's parameters (JSON only: they also travel to deployments)."""
    row = STAGE_BY_NAME[stage]
    section = getattr(cfg, row.section).model_dump(mode="json")
    if row.params == "section+advanced":
        from stamp.config_models import AdvancedConfig

        advanced = (cfg.advanced_config or AdvancedConfig()).model_dump(mode="json")
        params = {"section": section, "advanced": advanced}
        if stage == "crossval" and "task_concurrency" in cfg.orchestration.model_fields_set:
            params["task_concurrency"] = cfg.orchestration.task_concurrency  # folds at once
        return params
    return {row.params: section}


def stage_flow(stage: str) -> Any:
    """The stage's Prefect flow (imported on first use: torch and matplotlib cost seconds)."""
    row = STAGE_BY_NAME[stage]
    if row.flow is None:
        raise StageFailed(f"{stage}: not built yet (issue #{row.issue})")
    module, function = row.flow.split(":")
    return getattr(importlib.import_module(module), function)


def _in_process(stage: str, params: dict[str, Any], cfg: StampConfig) -> dict[str, Any]:
    flow = stage_flow(stage)
    if STAGE_BY_NAME[stage].per_slide_tasks:
        from stamp_flows.runners import thread_pool

        flow = flow.with_options(task_runner=thread_pool(cfg.orchestration.task_concurrency))
    return cast(dict[str, Any], flow(**params))


def _as_deployments(
    stage: str, name: str, runs: list[dict[str, Any]], timeout: float | None = None
) -> dict[str, Any]:
    """Start one flow run of deployment ``name`` per parameter set, wait for all, fail if any failed.

    ``timeout`` (seconds): runs not final by then are cancelled and the stage fails.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    tags = [REDACT_TAG] if redacting() else None  # a redacted cohort's stages stay redacted on their pools
    started = [
        cast(FlowRun, run_deployment(name, parameters=p, timeout=0, as_subflow=True, tags=tags)) for p in runs
    ]
    logger.info("%s: started %d run(s) of deployment %s", stage, len(started), name)
    pending = {r.id for r in started}
    states: dict[Any, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                from prefect.states import Cancelled

                for run_id in pending:
                    client.set_flow_run_state(
                        run_id, Cancelled(message="stamp run: deployment timeout"), force=True
                    )
                raise StageFailed(
                    f"{stage}: {len(pending)} run(s) of deployment {name} not finished after {timeout:g} s "
                    "(orchestration.deployment_timeout_s); is a worker polling its work pool? They were cancelled"
                )
            for run_id in list(pending):
                run = client.read_flow_run(run_id)
                if run.state is not None and run.state.is_final():
                    states[run_id] = run.state
                    pending.discard(run_id)
            if pending:
                time.sleep(2)
    bad = {str(k): v.name for k, v in states.items() if not v.is_completed()}
    if bad:
        raise StageFailed(f"{stage}: deployment {name} run(s) ended {bad}; see them in the Prefect UI")
    return {"deployment": name, "flow_runs": [str(r.id) for r in started]}


def prefetch_stage_modules(stages: list[str]) -> None:
    """Import the flow modules of ``stages`` in a background thread (torch, matplotlib: seconds each),
    so that they load while earlier stages wait on slides and the API instead of after them."""
    flows = [STAGE_BY_NAME[s].flow for s in stages]
    names = list(dict.fromkeys(f.split(":")[0] for f in flows if f is not None))

    def load() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the stage itself imports it again and reports the error
                return

    if names:
        threading.Thread(target=load, name="stamp-prefetch", daemon=True).start()


@contextmanager
def stage_subflow_settings() -> Iterator[None]:
    """Settings for a stage run as a subflow in this process: no heartbeat thread of its own.

    The parent run's heartbeat already says that this process is alive, and each flow run's heartbeat
    thread costs up to a second when it ends (it sleeps in one-second steps). A deployment run (worker)
    keeps its heartbeats.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def run_stage(stage: str, cfg: StampConfig) -> dict[str, Any]:
    """Run one stage in-process or as its configured deployment(s); returns the stage's result."""
    params = stage_parameters(stage, cfg)
    deployment = cfg.orchestration.deployments.get(stage)  # type: ignore[call-overload]
    if deployment is None:
        with stage_subflow_settings():
            return _in_process(stage, params, cfg)
    if stage == "preprocess":
        n = cfg.orchestration.preprocess_shards
        shards = [{**params, "shard": i, "shards": n} for i in range(n)]
        return _as_deployments(stage, deployment, shards, cfg.orchestration.deployment_timeout_s)
    return _as_deployments(stage, deployment, [params], cfg.orchestration.deployment_timeout_s)


def _report(
    config_path: str,
    timings: dict[str, float],
    outcomes: dict[str, str],
    results: dict[str, Any] | None = None,
) -> str:
    lines = [
        f"# cohort run: {markdown_code(config_path)}",
        "",
        "| stage | outcome | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {markdown_cell(outcomes[s])} | {timings.get(s, 0.0):.1f} |" for s in outcomes]
    used = ((results or {}).get("statistics") or {}).get("inputs") or []
    if used:
        lines += ["", "statistics used these prediction files:", "", "| file | sha256 |", "|---|---|"]
        lines += [f"| {markdown_code(i['file'])} | `{i['sha256']}` |" for i in used]
    return "\n".join(lines) + "\n"


@flow(name="cohort")
def cohort_flow(
    config_path: str | None = None,
    stages: list[str] | None = None,
    snapshot_path: str | None = None,
    snapshot_sha256: str | None = None,
) -> dict[str, Any]:
    """Every configured stage of ``config_path`` in order, each as a subflow (or deployment run).

    ``snapshot_path`` + ``snapshot_sha256`` (what the ``stamp watch`` trigger passes) run a watcher
    snapshot of an INBOX cohort instead: refused when its sha256 differs, confined to the cohort's folders.

    Returns ``{"config": path, "stages": {stage: result}, "seconds": {stage: s}, "report": md}``.
    A failing stage stops the later stages (they need its outputs) and fails the flow run.
    """
    guard: AbstractContextManager[None] = nullcontext()
    if snapshot_path is not None:
        if not snapshot_sha256:
            raise ValueError("cohort: snapshot_path needs snapshot_sha256 (the watcher's event carries both)")
        cfg, conf, source = load_snapshot(snapshot_path, snapshot_sha256)
        check_tables(cfg, conf)
        conf.work_dir.mkdir(parents=True, exist_ok=True)
        guard, label = enforced(conf), f"{source} (snapshot sha256 {snapshot_sha256[:12]})"
    elif config_path is not None:
        cfg, label = load_config(Path(config_path)), str(config_path)
    else:
        raise ValueError("cohort: give config_path (or snapshot_path and snapshot_sha256 from `stamp watch`)")
    # an INBOX cohort keeps slide names, patient ids and images out of Prefect (M12)
    with guard, redaction_scope(snapshot_path is not None or redacting()):
        return _run(cfg, label, stages)


def _run(cfg: StampConfig, config_path: str, stages: list[str] | None) -> dict[str, Any]:
    plan = stage_plan(cfg, stages)
    logger.info("cohort %s: stages %s", config_path, ", ".join(plan) or "(none)")
    in_process = [s for s in plan if s not in cfg.orchestration.deployments]
    prefetch_stage_modules(in_process[1:])
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    outcomes: dict[str, str] = {}
    for stage in plan:
        if not STAGE_BY_NAME[stage].built:
            logger.warning("%s: configured but not built yet; skipped (its section is ignored)", stage)
            outcomes[stage] = "skipped: not built"
            continue
        t0 = time.perf_counter()
        try:
            results[stage] = run_stage(stage, cfg)
        except Exception as exc:
            timings[stage] = time.perf_counter() - t0
            outcomes[stage] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            create_markdown_artifact(key="cohort-report", markdown=_report(config_path, timings, outcomes))
            raise StageFailed(f"cohort {config_path}: stage {stage} failed: {exc}") from exc
        timings[stage] = time.perf_counter() - t0
        outcomes[stage] = "completed"
    report = _report(config_path, timings, outcomes, results)
    create_markdown_artifact(key="cohort-report", markdown=report)
    return {"config": str(config_path), "stages": results, "seconds": timings, "report": report}
