"""Keep Prefect's run logs free of tracebacks for errors that are the user's input, not our bug.

Such errors (a missing prediction CSV, an unknown column, a bad config value, a slide that cannot
be read) carry a one-line message that says what to do; the command prints it, and a traceback
in the terminal would only bury it. Every other exception keeps its traceback.
"""

from __future__ import annotations

import logging

#: Exception class names whose message is the whole story (matched by name: no imports needed).
USER_ERRORS = frozenset(
    {
        "ConfigError",
        "FileNotFoundError",
        "StatisticsError",
        "HeatmapError",
        "StageFailed",
        "SlideFailed",
        "SlideLocked",
    }
)


class DropUserErrorTracebacks(logging.Filter):
    """Strip the traceback (not the message) from records about a user-input error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ in USER_ERRORS:
            record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Attach the filter to Prefect's flow- and task-run loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        log = logging.getLogger(name)
        if not any(isinstance(f, DropUserErrorTracebacks) for f in log.filters):
            log.addFilter(DropUserErrorTracebacks())
