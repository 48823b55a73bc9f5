"""What one task's statistics produced, merged into :class:`stamp.statistics.StatisticsResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Outcome"]


@dataclass
class Outcome:
    """Files written, PNG plots, flat metric rows and summary lines (Markdown bullets) of one task."""

    files: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
