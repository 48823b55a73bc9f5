"""Cooperative stop: SIGTERM / SIGINT interrupt the running work within seconds (contract 6).

The signal reaches the main thread only, while the work (a slide, a fold, a heatmap) runs in worker
threads. :func:`request_stop` sets a process-wide flag; long loops call :func:`check_stop` between
units of work (a batch, an epoch step, a patient, an integrated-gradients step), which raises
:class:`StopRequested` — a ``BaseException`` like ``KeyboardInterrupt``, so "one bad slide never stops
the others" handlers (``except Exception``) let it through. Temp files and staging folders are removed
on the way out, so nothing partial is left.

Who sets the flag: :func:`handle_stop_signals` (the CLI, for SIGTERM and SIGINT) and the flows' task
runner when the flow is interrupted (Prefect turns SIGTERM into ``TerminationSignal`` in the flow).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = [
    "StopRequested",
    "check_stop",
    "clear_stop",
    "handle_stop_signals",
    "request_stop",
    "stop_requested",
]

_STOP = threading.Event()
_REASON: list[str] = []


class StopRequested(BaseException):
    """The run was asked to stop (SIGTERM, SIGINT, a cancelled flow run); raised inside the work."""


def request_stop(reason: str = "stop requested") -> None:
    """Ask every running loop in this process to stop at its next :func:`check_stop`."""
    _REASON[:] = [reason]
    _STOP.set()


def clear_stop() -> None:
    """Forget an earlier stop request (a new run starts in this process)."""
    _STOP.clear()
    _REASON.clear()


def stop_requested() -> bool:
    """Whether a stop was requested."""
    return _STOP.is_set()


def check_stop() -> None:
    """Raise :class:`StopRequested` if a stop was requested."""
    if _STOP.is_set():
        raise StopRequested(_REASON[0] if _REASON else "stop requested")


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    request_stop(f"stopped by {signal.Signals(signum).name}")
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def handle_stop_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT set the stop flag and raise ``KeyboardInterrupt`` in the main thread.

    SIGTERM (``docker stop``, ``scancel``, systemd) then stops a run as cleanly as Ctrl-C. Outside
    the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in before:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
