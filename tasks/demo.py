"""Prefect task that writes the demo's config for its synthetic cohort (:func:`stamp.demo.demo_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import task

from stamp.config import dump_config, load_config
from stamp.demo import demo_config
from stamp.fileio import atomic_path


@task(name="write-demo-config")
def write_demo_config(out: str, cohort: dict[str, Any]) -> str:
    """Write ``<out>/config.yaml`` (validated through the same loader the commands use)."""
    path = Path(out) / "config.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(demo_config(Path(out), cohort), sort_keys=False))
        cfg = load_config(tmp)  # fails loudly if the demo config drifted from the schema
        tmp.write_text("# Written by `stamp demo` for its synthetic cohort.\n" + dump_config(cfg))
    return str(path)
