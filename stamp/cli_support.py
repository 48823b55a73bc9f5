"""Helpers shared by the ``stamp`` command handlers (argparse only at import time)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

R = TypeVar("R")


def process_age_s() -> float:
    """Seconds since this process started (from /proc; 0.0 where that cannot be read)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)


@dataclass
class CommandTimes:
    """Where a command's wall time went, for the ``stamp -v`` timing line."""

    started_at: float = 0.0  # perf_counter() value at which the process started
    target: Any = None  # the PrefectTarget of the command, once configured
    flow_started: float | None = None
    flow_s: float = 0.0

    def line(self, now: float) -> str:
        """``timing: start-up A s · API B s · flow C s · write-out D s · total E s``."""
        total = now - self.started_at
        api = float(getattr(self.target, "waited_s", 0.0) or 0.0)
        if self.flow_started is None:
            return f"timing: total {total:.2f} s (no flow ran)"
        startup = self.flow_started - self.started_at - api
        write_out = total - startup - api - self.flow_s
        return (
            f"timing: start-up {startup:.2f} s · API {api:.2f} s · flow {self.flow_s:.2f} s · "
            f"write-out {write_out:.2f} s · total {total:.2f} s"
        )


TIMES = CommandTimes(started_at=time.perf_counter() - process_age_s())


def fail(message: str, status: int = 1) -> int:
    """Print ``stamp: <message>`` to stderr and return ``status``."""
    print(f"stamp: {message}", file=sys.stderr)
    return status


def load(path: Path):  # noqa: ANN201 - StampConfig, imported lazily
    """The validated config at ``path``."""
    from stamp.config import load_config

    return load_config(path)


def configure_prefect(args: argparse.Namespace, cfg: Any = None, *, start_server: bool = True):  # noqa: ANN201
    """Point Prefect at the configured / local / embedded API (before ``import prefect``).

    Without a configured API this starts the local server in the background when none runs
    (``start_server=False``: only find one); :func:`run_flow` waits for it.
    """
    from stamp_flows.runtime import configure_prefect

    orch = getattr(cfg, "orchestration", None) if cfg is not None else None
    TIMES.target = configure_prefect(
        api_url=getattr(orch, "prefect_api_url", None),
        prefect_home=getattr(orch, "prefect_home", None),
        result_dir=getattr(orch, "result_dir", None),
        verbosity=args.verbose,
        start_server=start_server,
    )
    return TIMES.target


def wait_for_api() -> None:
    """Block until the API this command talks to answers (the local server may still be starting)."""
    if TIMES.target is not None:
        TIMES.target.wait_ready()


def run_flow(flow: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call a flow (or a function running one) once the API answers; its seconds go in the timing line."""
    wait_for_api()
    t0 = time.perf_counter()
    if TIMES.flow_started is None:
        TIMES.flow_started = t0
    try:
        return flow(*args, **kwargs)
    finally:
        TIMES.flow_s += time.perf_counter() - t0


class _StageSection(Protocol):
    """A config section of a stage that writes output (every such section has ``output_dir``)."""

    output_dir: Path


def start_stage(args: argparse.Namespace, section: str):  # noqa: ANN201
    """Load the config, log to ``<output_dir>/logfile.log`` and log the section (STAMP-style)."""
    from stamp.config import require_section, section_yaml
    from stamp.logs import add_file_log, logger

    cfg = load(args.config)
    sec = cast(_StageSection, require_section(cfg, section))
    add_file_log(Path(sec.output_dir))
    logger.info(
        "stamp %s with %s, section %s:\n%s", args.command, args.config, section, section_yaml(cfg, section)
    )
    return cfg, sec
