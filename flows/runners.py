"""The task runner every stage flow uses: Prefect's thread pool, made stoppable.

When a flow is interrupted — Ctrl-C (``KeyboardInterrupt``), SIGTERM from ``docker stop`` /
``scancel`` / a cancelled deployment run (Prefect raises ``TerminationSignal`` in the flow) — Prefect
leaves the runner's context and waits for the running tasks to finish: a whole fold, a whole slide.
:class:`StoppableThreadPool` sets :func:`stamp.stopping.request_stop` first, so the work stops at its
next check (seconds) and removes its temp files on the way out.
"""

from __future__ import annotations

from typing import Any, cast

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from stamp.stopping import clear_stop, request_stop

__all__ = ["StoppableThreadPool", "thread_pool"]


class StoppableThreadPool(ThreadPoolTaskRunner):  # type: ignore[type-arg]
    """``ThreadPoolTaskRunner`` that asks running tasks to stop when the flow is interrupted."""

    def __enter__(self) -> StoppableThreadPool:
        clear_stop()  # a new run in this process starts clean
        super().__enter__()
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            request_stop(f"flow interrupted ({exc_type.__name__})")
        super().__exit__(exc_type, exc_value, traceback)


def thread_pool(max_workers: int) -> TaskRunner[PrefectFuture[Any]]:
    """A :class:`StoppableThreadPool` of ``max_workers`` threads, typed as ``flow`` expects."""
    return cast(TaskRunner[PrefectFuture[Any]], StoppableThreadPool(max_workers=max_workers))
