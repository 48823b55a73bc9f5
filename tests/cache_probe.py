"""A tiny Prefect task/flow using the stage cache policy; imported by tests and their subprocesses."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from prefect import flow, task

from stamp_tasks.cache import content_cache_policy

POLICY = content_cache_policy(
    "probe-v1", content_args=("slide_path",), ignore_args=("counter", "sleep_s", "out_path")
)


@task(cache_policy=POLICY, persist_result=True)
def probe_stage(
    slide_path: str, tile_size_um: float, out_path: str, counter: str, sleep_s: float = 0.0
) -> str:
    """Pretend to process a slide: count the execution, write an output, return its path."""
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(sleep_s)
    Path(out_path).write_text(f"{Path(slide_path).read_bytes()[:8].hex()} {tile_size_um}")
    return out_path


@flow
def probe_flow(
    slide_path: str, tile_size_um: float, out_path: str, counter: str, sleep_s: float = 0.0
) -> str:
    """One task run, so tests can count executions across flow runs and processes."""
    result = probe_stage(slide_path, tile_size_um, out_path, counter, sleep_s)
    if not Path(result).exists():  # a cached result whose file was deleted: run it again
        result = probe_stage.with_options(refresh_cache=True)(
            slide_path, tile_size_um, out_path, counter, sleep_s
        )
    return result


if __name__ == "__main__":
    print(probe_flow(sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])))
