"""Per-command Prefect overhead: what a `stamp` command pays before and after its real work.

Runs, each in a fresh process exactly as a command does (``configure_prefect`` then a flow
with one task), a trivial flow:

1. embedded API, fresh ``PREFECT_HOME`` (first command on a new machine: DB migrations),
2. embedded API, existing ``PREFECT_HOME``,
3. against a running ``stamp server`` (reused via ``$PREFECT_HOME/stamp-server.json``),

and prints wall seconds and the ratio to the floor = the same process without Prefect
(interpreter start + ``import stamp``). Usage: ``python bench/bench_prefect_overhead.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time
from stamp_flows.runtime import configure_prefect
target = configure_prefect(verbosity=0)
if sys.argv[1] == "floor":
    import stamp.hashing  # noqa: F401
    print("floor"); raise SystemExit(0)
from prefect import flow, task

@task
def one() -> int:
    return 1

@flow
def trivial() -> int:
    return one()

assert trivial() == 1
print(target.mode)
"""


def _run(mode: str, home: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    env["STAMP_SERVER_AUTOSTART"] = "0"  # embedded rows stay embedded; a running server is still found
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stamp_flows.server import start_server, stop_server

    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "prefect-home"
        floor = min(_run("floor", home)[0] for _ in range(args.repeat))
        rows.append(("floor: python + import stamp (no Prefect)", floor, "-"))
        wall, mode = _run("flow", home)
        rows.append(("embedded API, fresh PREFECT_HOME", wall, mode))
        best = min(_run("flow", home)[0] for _ in range(args.repeat))
        rows.append(("embedded API, existing PREFECT_HOME", best, "embedded"))
        t0 = time.perf_counter()
        start_server(home)
        started = time.perf_counter() - t0
        try:
            runs = [_run("flow", home) for _ in range(args.repeat)]
            rows.append(("running `stamp server` (reused)", min(w for w, _ in runs), runs[0][1]))
        finally:
            stop_server(home)
        rows.append(("  (one-off: `stamp server` start-up)", started, "-"))
    print(f"{'setup':45s} {'wall s':>8s} {'× floor':>8s}  mode")
    for name, wall, mode in rows:
        print(f"{name:45s} {wall:8.2f} {wall / floor:8.1f}  {mode}")


if __name__ == "__main__":
    main()
