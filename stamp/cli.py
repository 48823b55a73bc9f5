"""The ``stamp`` command line: STAMP's commands and config, each run as a Prefect flow.

Only argparse is imported at start-up (``stamp --help`` answers in well under a second);
config models, Prefect and torch are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from stamp import cli_stages
from stamp.cli_support import TIMES, run_flow
from stamp.cli_support import configure_prefect as _configure_prefect
from stamp.cli_support import fail as _fail
from stamp.cli_support import load as _load
from stamp.stages import STAGE_BY_NAME, STAGES

EXIT_NOT_BUILT = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``stamp [-c CONFIG] [-v] COMMAND ...``)."""
    parser = argparse.ArgumentParser(
        prog="stamp",
        description="STAMP-compatible pathology pipeline (WSI → features → MIL → statistics → heatmaps), "
        "every stage a Prefect flow.",
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=Path("config.yaml"), help="config file (default: ./config.yaml)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("init", help="Write a commented template config to --config (never overwrites)")
    sub.add_parser("config", help="Validate the config and print it as YAML")
    for row in STAGES:
        stage = sub.add_parser(row.name, help=row.help)
        if row.name == "preprocess":
            stage.add_argument(
                "--list-encoders", action="store_true", help="print the encoder table and exit"
            )
    sub.add_parser("encoders", help="List the tile encoders: dims, tile size, mpp, weights, licence, gating")

    run = sub.add_parser(
        "run", help="Run every configured stage of the config as one Prefect flow (the `cohort` flow)"
    )
    run.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        default=None,
        help="only these stages (default: every stage whose section is in the config)",
    )

    synth = sub.add_parser("synth", help="Write a synthetic slide cohort with a planted biomarker")
    synth.add_argument("--out", type=Path, required=True, help="output folder")
    synth.add_argument("--patients", type=int, default=12, help="number of patients (default 12)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--size", type=int, default=None, help="level-0 slide width/height in px")
    synth.add_argument("--no-variants", action="store_true", help="skip the broken/no-mpp extra slides")

    demo = sub.add_parser("demo", help="Run the pipeline on the built-in synthetic cohort")
    demo.add_argument(
        "--out", type=Path, default=Path("stamp-demo"), help="output folder (default ./stamp-demo)"
    )
    demo.add_argument("--patients", type=int, default=32, help="number of synthetic patients (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    watch = sub.add_parser(
        "watch", help="Watch a folder for new cohorts (READY + config.yaml) and trigger the cohort deployment"
    )
    watch.add_argument("inbox", type=Path, help="folder whose sub-folders are cohorts (untrusted)")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between scans (default 10)")
    watch.add_argument("--once", action="store_true", help="scan once and exit")
    watch.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="private records + config snapshots (default $STAMP_HOME/watch)",
    )
    watch.add_argument(
        "--work-root",
        type=Path,
        default=None,
        help="each cohort's outputs go under WORK_ROOT/<cohort> (default $STAMP_HOME/work)",
    )
    watch.add_argument(
        "--data-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder cohorts may also read from (slides, weights); repeatable",
    )
    watch.add_argument(
        "--allow-deployment",
        action="append",
        default=[],
        metavar="FLOW/DEPLOYMENT",
        help="a deployment a cohort's orchestration.deployments may name; repeatable (default: none)",
    )

    deploy_flows = sub.add_parser(
        "deploy-flows", help="Create the work pools and register the deployments of deployments/prefect.yaml"
    )
    deploy_flows.add_argument(
        "--pool",
        action="append",
        default=None,
        metavar="POOL",
        help="only this pool (name or type); repeatable",
    )

    worker = sub.add_parser(
        "worker", help="Start a Prefect worker for one of the pools of deployments/work-pools.yaml"
    )
    worker.add_argument("--pool", required=True, help="work pool name, e.g. stamp-process")
    worker.add_argument(
        "worker_args", nargs=argparse.REMAINDER, help="passed on to the worker, e.g. --limit 2"
    )

    server = sub.add_parser("server", help="Run a local Prefect server + UI that stamp commands reuse")
    server.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --public-url)"
    )
    server.add_argument(
        "--public-url", default=None, help="https:// URL of the TLS proxy in front of the server (for --host)"
    )
    server.add_argument(
        "--database",
        default=os.environ.get("STAMP_SERVER_DATABASE_URL"),
        help="server database URL, e.g. postgresql+asyncpg://prefect@dbhost/prefect "
        "(default: $STAMP_SERVER_DATABASE_URL, else SQLite under PREFECT_HOME)",
    )
    mode = server.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true", help="start it detached and return")
    mode.add_argument("--stop", action="store_true", help="stop the server started with --background")
    return parser


def _cmd_init(args: argparse.Namespace) -> int:
    from stamp.config import write_template

    try:
        write_template(args.config)
    except FileExistsError:
        return _fail(
            f"{args.config} already exists; not overwriting it (remove it or pass another path with -c)"
        )
    print(
        f"Wrote a template config to {args.config}; edit the paths, then run e.g. `stamp -c {args.config} preprocess`."
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from stamp.config import dump_config

    print(dump_config(_load(args.config)), end="")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from stamp.logs import add_file_log, logger

    target = _configure_prefect(args)
    add_file_log(args.out)
    logger.info(target.describe())
    from stamp_flows.synth import synth_flow

    info = run_flow(
        synth_flow,
        out=str(args.out),
        patients=args.patients,
        seed=args.seed,
        size=args.size,
        variants=not args.no_variants,
    )
    print(info["summary"])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stamp.logs import add_file_log, logger

    target = _configure_prefect(args)
    add_file_log(args.out)
    logger.info(target.describe())
    from stamp_flows.demo import demo_flow

    report = run_flow(demo_flow, out=str(args.out), patients=args.patients, seed=args.seed)
    print(report)
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    target = _configure_prefect(args, start_server=False)
    from stamp_flows.server import serve_foreground, start_server, stop_server

    if args.stop:
        stopped = stop_server(target.home)
        print("Stopped the local Prefect server." if stopped else "No local Prefect server was recorded.")
        return 0
    if target.mode == "local-server":
        from stamp_flows.server import recorded_server

        idle = float((recorded_server(target.home) or {}).get("idle_timeout_s", 0) or 0)
        note = (
            f" (started by a command: it stops after {idle / 60:g} min idle; `stamp server --stop` first "
            "for one that stays up)"
            if idle and not args.stop
            else ""
        )
        print(f"A local Prefect server is already running: {target.api_url}{note}")
        return 0
    where = {"host": args.host, "port": args.port, "public_url": args.public_url, "database": args.database}
    try:
        if args.background:
            proc, api_url = start_server(target.home, **where)
            print(
                f"Prefect UI: {args.public_url or api_url.removesuffix('/api')} (pid {proc.pid}); "
                "stop it with `stamp server --stop`."
            )
            return 0
        return serve_foreground(target.home, **where)
    except (ValueError, PermissionError) as exc:
        return _fail(str(exc))


def _cmd_encoders(args: argparse.Namespace) -> int:
    from stamp.encoders import encoder_table

    print(encoder_table())
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    issue = STAGE_BY_NAME[args.command].issue
    tracked = f"tracked in issue #{issue}" if issue else "no issue filed for it yet"
    return _fail(
        f"{args.command}: this stage is not built yet ({tracked}); nothing was written.", EXIT_NOT_BUILT
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as their one line, without a traceback."""
    from stamp.config import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, name in (
        ("stamp.statistics", "StatisticsError"),
        ("stamp.heatmaps", "HeatmapError"),
        ("stamp_flows.cohort", "StageFailed"),
    ):
        if module in sys.modules:  # only what the command imported
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


HANDLERS = {
    "init": _cmd_init,
    "config": _cmd_config,
    "synth": _cmd_synth,
    "demo": _cmd_demo,
    "server": _cmd_server,
    "encoders": _cmd_encoders,
    # a built stage's handler is cli_stages.cmd_<name>; a stage without a flow says it is not built
    **{row.name: getattr(cli_stages, f"cmd_{row.name}") for row in STAGES if row.built},
    "run": cli_stages.cmd_run,
    "watch": cli_stages.cmd_watch,
    "deploy-flows": cli_stages.cmd_deploy_flows,
    "worker": cli_stages.cmd_worker,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stamp`` console script; returns the exit status."""

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    from stamp.logs import logger, setup_logging
    from stamp.stopping import StopRequested, handle_stop_signals

    setup_logging(args.verbose)
    handler = HANDLERS.get(args.command, _cmd_stage)
    try:
        with handle_stop_signals():  # SIGTERM (docker stop, scancel) stops a run like Ctrl-C
            status = handler(args)
        if args.verbose and TIMES.flow_started is not None:
            from stamp_flows.runtime import flush_prefect

            flush_prefect()
            print(TIMES.line(time.perf_counter()), file=sys.stderr)
        return status
    except (KeyboardInterrupt, StopRequested) as exc:
        return _fail(f"interrupted ({exc or 'SIGINT'}); finished outputs are kept, nothing partial", 130)
    except Exception as exc:  # user-facing errors: one line; anything else: traceback in the log
        if isinstance(exc, _user_errors()):
            return _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        logger.exception(f"{args.command} failed: {exc}")
        return 1


def console_main() -> None:
    """Entry point of the ``stamp`` console script: :func:`main`, then a quick exit.

    Tearing the interpreter down (freeing every module of torch, Prefect and matplotlib) costs about a
    second per command and does nothing a command needs. So after :func:`main` the exit does what
    matters of it — joins running threads, runs the exit handlers (Prefect's last logs and events,
    temporary folders, worker pools), flushes logs and output — and ends the process.
    ``STAMP_QUICK_EXIT=0`` exits the usual way.
    """
    import atexit
    import threading

    status = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    join_threads = getattr(threading, "_shutdown", None)
    if os.environ.get("STAMP_QUICK_EXIT", "1") == "0" or run_exit_handlers is None or join_threads is None:
        sys.exit(status)
    join_threads()
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
