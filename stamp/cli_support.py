"""Helpers shared by the ``stamp`` command handlers (argparse only at import time)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Protocol, cast


def fail(message: str, status: int = 1) -> int:
    """Print ``stamp: <message>`` to stderr and return ``status``."""
    print(f"stamp: {message}", file=sys.stderr)
    return status


def load(path: Path):  # noqa: ANN201 - StampConfig, imported lazily
    """The validated config at ``path``."""
    from stamp.config import load_config

    return load_config(path)


def configure_prefect(args: argparse.Namespace, cfg: Any = None):  # noqa: ANN201
    """Point Prefect at the configured / local / embedded API (before ``import prefect``)."""
    from stamp_flows.runtime import configure_prefect

    orch = getattr(cfg, "orchestration", None) if cfg is not None else None
    return configure_prefect(
        api_url=getattr(orch, "prefect_api_url", None),
        prefect_home=getattr(orch, "prefect_home", None),
        result_dir=getattr(orch, "result_dir", None),
        verbosity=args.verbose,
    )


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
