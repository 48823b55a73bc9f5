"""Crossval folds in worker processes, so several train at once without sharing torch's global state.

Training seeds torch's global generator, switches deterministic algorithms on and draws dropout masks
from the global generator, so two folds in two threads of one process would change each other's
numbers. Each fold here runs :func:`stamp.modeling.crossval.run_fold` in a worker process of one
spawn-started pool of ``concurrency`` processes (kept for the next folds), each with
``cores // concurrency`` torch threads and its own :class:`stamp.modeling.data.BagStore` (a
``1/concurrency`` share of the memory budget). A fold's result depends on its seed and the thread
count only, never on which fold ran beside it: the same seed and ``task_concurrency`` give identical
predictions.

On small CPU models one thread per fold and two folds at a time beat two threads on one fold by far
(intra-op threads on tiny matrices mostly wait for each other). The workers' ``stamp`` log records
are forwarded to this process's ``stamp`` logger. A stop request here (:mod:`stamp.stopping`) reaches
the workers within a second; their staging folders are removed on the way out as in-process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from stamp.stopping import StopRequested, request_stop, stop_requested

__all__ = ["available_cores", "fold_threads", "run_fold_in_worker", "shutdown_pool"]

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_stop: Any = None  # multiprocessing Event shared with the workers
_listener: logging.handlers.QueueListener | None = None


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def fold_threads(concurrency: int) -> int:
    """torch threads of each of ``concurrency`` fold workers."""
    return max(1, available_cores() // max(1, concurrency))


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _watch(stop: Any) -> None:  # pragma: no cover - in workers
    from stamp.stopping import clear_stop

    while True:
        stop.wait()
        request_stop("crossval stopped")
        while stop.is_set():
            time.sleep(0.2)
        clear_stop()


def _exit_with_parent(parent: int) -> None:  # pragma: no cover - in workers
    """End this worker when the process that started it is gone (``kill -9`` of ``stamp crossval``): an
    orphaned fold would keep training, holding the cores and the output pipe of a dead run."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init(threads: int, budget: int, stop: Any, queue: Any) -> None:  # pragma: no cover - in workers
    import torch

    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="stamp-parent-watch"
    ).start()

    torch.set_num_threads(threads)
    os.environ["STAMP_BAG_CACHE_BYTES"] = str(budget)
    logger = logging.getLogger("stamp")
    logger.handlers = [logging.handlers.QueueHandler(queue)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    threading.Thread(target=_watch, args=(stop,), daemon=True, name="stamp-stop-watch").start()


def _get_pool(concurrency: int) -> tuple[ProcessPoolExecutor, Any]:
    global _pool, _pool_size, _stop, _listener
    with _lock:
        if _pool is not None and _pool_size == concurrency:
            return _pool, _stop
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
        from stamp.modeling.data import bag_store

        ctx = multiprocessing.get_context("spawn")
        _stop = ctx.Event()
        queue = ctx.Queue()
        if _listener is not None:
            _listener.stop()
        _listener = logging.handlers.QueueListener(queue, _Forward())
        _listener.start()
        budget = bag_store().max_bytes // concurrency
        _pool = ProcessPoolExecutor(
            concurrency,
            mp_context=ctx,
            initializer=_init,
            initargs=(fold_threads(concurrency), budget, _stop, queue),
        )
        _pool_size = concurrency
        return _pool, _stop


def shutdown_pool() -> None:
    """Stop the fold workers (they are started again when needed)."""
    global _pool, _listener
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
            _pool = None
        if _listener is not None:
            _listener.stop()
            _listener = None


atexit.register(shutdown_pool)


def run_fold_in_worker(concurrency: int, *args: Any, **kwargs: Any) -> Path:
    """:func:`stamp.modeling.crossval.run_fold` (same arguments) in a worker of a pool of ``concurrency``."""
    from stamp.modeling.crossval import run_fold

    pool, stop = _get_pool(concurrency)
    if not stop_requested():
        stop.clear()
    future: Future[Path] = pool.submit(run_fold, *args, **kwargs)
    while True:
        try:
            return future.result(timeout=0.5)
        except FutureTimeout:
            if stop_requested():
                stop.set()
                with contextlib.suppress(BaseException):  # the worker's StopRequested, after its cleanup
                    future.result(timeout=60)
                raise StopRequested("crossval stopped") from None
