"""Logging like STAMP: logger ``stamp`` to stderr, plus ``logfile.log`` in each output dir."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TextIO

from stamp.fileio import open_append_nofollow

LOGGER_NAME = "stamp"
FILE_FORMAT = "%(asctime)s\t%(levelname)s\t%(message)s"
LOGFILE_NAME = "logfile.log"

logger = logging.getLogger(LOGGER_NAME)
_plain_showwarning = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Our own warning classes (e.g. ``OperatingPointWarning``) as one log line; others as Python prints them."""
    if category.__module__.startswith("stamp."):
        logger.warning("%s", message)
    else:
        _plain_showwarning(message, category, filename, lineno, file, line)


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Send ``stamp`` log records to stderr: INFO by default, DEBUG with ``-v``; our warnings go there too."""
    warnings.showwarning = _show_warning
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not any(getattr(h, "_stamp_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._stamp_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for h in logger.handlers:
        if getattr(h, "_stamp_console", False):
            h.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    return logger


class _NoFollowFileHandler(logging.FileHandler):
    """A ``FileHandler`` that will not append through a symlink planted at the log's path."""

    def _open(self):  # noqa: ANN202 - the base class's signature
        return os.fdopen(open_append_nofollow(self.baseFilename), "a", encoding=self.encoding)


def add_file_log(output_dir: Path) -> Path:
    """Also log DEBUG records to ``<output_dir>/logfile.log`` (appending); return its path.

    A symlink at that path is refused (``OSError``): a shared output folder cannot redirect the log.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir.resolve() / LOGFILE_NAME
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path:
            return path
    handler = _NoFollowFileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    logger.addHandler(handler)
    return path


def remove_file_logs() -> None:
    """Close and detach every file handler of the ``stamp`` logger (tests, repeated commands)."""
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
