"""Handlers of the ``stamp`` commands that run pipeline stages and orchestration.

Each handler takes the parsed arguments and returns the exit status; heavy modules (config models,
Prefect, torch) are imported inside the handler, so importing this module stays cheap.
"""

from __future__ import annotations

import argparse

from stamp.cli_support import configure_prefect as _configure_prefect
from stamp.cli_support import fail as _fail
from stamp.cli_support import load as _load
from stamp.cli_support import run_flow as _run_flow
from stamp.cli_support import start_stage as _start_stage


def cmd_preprocess(args: argparse.Namespace) -> int:
    """`stamp preprocess`: slides → tile features; exit 1 when a slide failed."""
    if args.list_encoders:
        from stamp.encoders import encoder_table

        print(encoder_table())
        return 0
    from stamp.logs import logger

    cfg, sec = _start_stage(args, "preprocessing")
    target = _configure_prefect(args, cfg)
    logger.info(target.describe())
    from stamp_flows.preprocess import run_preprocess, summary_line

    result = _run_flow(run_preprocess, sec, cfg.orchestration.task_concurrency)
    for row in result["rows"]:
        if row["status"] in ("failed", "skipped"):
            print(f"  {row['status']}: {row['slide']}: {row['reason']}")
    print(summary_line(result))
    return 1 if result["counts"]["failed"] else 0


def _advanced(cfg):  # noqa: ANN001, ANN202
    from stamp.config_models import AdvancedConfig

    return (cfg.advanced_config or AdvancedConfig()).model_dump(mode="json")


def cmd_train(args: argparse.Namespace) -> int:
    """`stamp train`: one model on all usable patients."""
    cfg, sec = _start_stage(args, "training")
    _configure_prefect(args, cfg)
    from stamp_flows.modeling import train_flow

    result = _run_flow(train_flow, section=sec.model_dump(mode="json"), advanced=_advanced(cfg))
    print(
        f"train: {result['train_patients']} train / {result['valid_patients']} valid patients → {result['checkpoint']}"
    )
    return 0


def cmd_crossval(args: argparse.Namespace) -> int:
    """`stamp crossval`: k-fold cross-validation, one cached task per fold."""
    cfg, sec = _start_stage(args, "crossval")
    _configure_prefect(args, cfg)
    from stamp_flows.modeling import crossval_flow

    # folds at once: orchestration.task_concurrency when the config sets it, else one per CPU core (one on a GPU)
    orch = cfg.orchestration
    folds = orch.task_concurrency if "task_concurrency" in orch.model_fields_set else None
    result = _run_flow(
        crossval_flow, section=sec.model_dump(mode="json"), advanced=_advanced(cfg), task_concurrency=folds
    )
    print(result["summary"], end="")
    print(f"crossval: {len(result['folds'])} folds in {result['seconds']:.1f} s → {result['output_dir']}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """`stamp deploy`: predictions of one or more checkpoints (+ ensemble)."""
    cfg, sec = _start_stage(args, "deployment")
    _configure_prefect(args, cfg)
    from stamp_flows.modeling import deploy_flow

    result = _run_flow(deploy_flow, section=sec.model_dump(mode="json"))
    for path in result["files"]:
        print(f"deploy: wrote {path}")
    return 0


def cmd_statistics(args: argparse.Namespace) -> int:
    """`stamp statistics`: metrics with 95 % CIs and plots from prediction CSVs."""
    cfg, sec = _start_stage(args, "statistics")
    _configure_prefect(args, cfg)
    from stamp_flows.statistics import statistics_flow

    result = _run_flow(statistics_flow, section=sec.model_dump(mode="json"))
    print(result["summary"].strip())
    print(f"statistics: {len(result['files'])} files → {result['output_dir']}")
    return 0


def cmd_heatmaps(args: argparse.Namespace) -> int:
    """`stamp heatmaps`: per-slide maps and top tiles; exit 1 when a slide failed."""
    cfg, sec = _start_stage(args, "heatmaps")
    _configure_prefect(args, cfg)
    from stamp_flows.heatmaps import heatmaps_flow
    from stamp_flows.runners import thread_pool

    flow = heatmaps_flow.with_options(task_runner=thread_pool(cfg.orchestration.task_concurrency))
    result = _run_flow(flow, section=sec.model_dump(mode="json"))
    for row in result["rows"]:
        if row["status"] != "done":
            print(f"  {row['status']}: {row['slide']}: {row['reason']}")
    print(f"heatmaps: {len(result['slides'])} slides in {result['seconds']:.1f} s → {result['output_dir']}")
    return 1 if result["failed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    """`stamp run`: the cohort flow over every configured stage (or `--stages`)."""
    from stamp.logs import logger

    cfg = _load(args.config)
    target = _configure_prefect(args, cfg)
    logger.info(target.describe())
    from stamp_flows.cohort import cohort_flow, stage_plan

    try:
        stage_plan(cfg, args.stages)
    except ValueError as exc:
        return _fail(str(exc))
    result = _run_flow(cohort_flow, config_path=str(args.config.resolve()), stages=args.stages)
    print(result["report"], end="")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """`stamp watch INBOX`: trigger the cohort deployment for each new complete cohort folder."""
    from stamp.logs import logger

    target = _configure_prefect(args, start_server=False)
    logger.info(target.describe())
    from stamp_flows.watch import WatchSettings, watch

    try:
        settings = WatchSettings.create(
            args.inbox, args.state_dir, args.work_root, args.data_root, args.allow_deployment
        )
    except ValueError as exc:
        return _fail(str(exc))
    started = watch(settings, interval=args.interval, max_scans=1 if args.once else None)
    print(f"watch: {len(started)} cohort(s) triggered" + (f": {', '.join(started)}" if started else ""))
    return 0


def cmd_deploy_flows(args: argparse.Namespace) -> int:
    """`stamp deploy-flows`: create the work pools and register the deployments."""
    target = _configure_prefect(args, start_server=False)
    from stamp_flows.deployments import DeploymentError, register_deployments

    if target.mode == "embedded":
        return _fail(
            "deploy-flows needs a running Prefect server: start one with `stamp server --background` "
            "or set PREFECT_API_URL"
        )
    try:
        names = register_deployments(pools=args.pool)
    except DeploymentError as exc:
        return _fail(str(exc))
    for name in names:
        print(f"deployed {name}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """`stamp worker --pool NAME`: a Prefect worker for one of our pools, with our client settings.

    It runs ``prefect worker start`` (or our sbatch worker) in place of this process, with telemetry
    off and the local server's auth string when that is the server (what a bare ``prefect worker
    start`` does not do); SIGTERM from systemd then reaches the worker itself.
    """
    import os
    import sys

    target = _configure_prefect(args, start_server=False)
    from stamp_flows.deployments import DeploymentError, worker_command

    if target.mode == "embedded":
        return _fail(
            "a worker needs a running Prefect server: start one with `stamp server --background` "
            "or set PREFECT_API_URL (and PREFECT_API_AUTH_STRING)"
        )
    try:
        argv = worker_command(args.pool, args.worker_args)
    except DeploymentError as exc:
        return _fail(str(exc))
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 0  # not reached
