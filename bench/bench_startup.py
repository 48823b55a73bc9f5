"""Start-up cost of whole ``stamp`` commands, side by side in one run (wall seconds, several repetitions).

    python bench/bench_startup.py [--repeat 3] [--skip-demo]

Every command runs as a user runs it (the ``stamp`` console script in a fresh process) with a
private ``STAMP_HOME`` and no ``PREFECT_*`` variables. Rows:

- floor: ``python -c "import stamp"`` — the interpreter alone;
- ``stamp config`` (no Prefect);
- ``stamp preprocess`` on six small slides (256 µm and 64 µm tiles, ``empty`` extractor), **cold**: no
  server running (the first command of the day: it starts one), PREFECT_HOME already migrated;
- the same, **warm**: a server is running (new output folder each repetition);
- an unchanged rerun (every slide cached);
- ``stamp statistics`` on a 5-fold prediction set;
- ``stamp demo`` cached (an unchanged rerun of the demo), unless ``--skip-demo``.

For each row: best and median wall time, and the flow's own seconds from the ``stamp -v`` timing line
(``timing: ... flow X s ...``), so overhead = wall − flow. Goals (issue #17): cold preprocess ≤ 10 s,
warm overhead ≤ 3 s, cached demo ≤ 5 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STAMP = str(Path(sys.executable).with_name("stamp"))
TIMING = re.compile(r"timing: .*?flow ([0-9.]+) s")


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["STAMP_HOME"] = str(root / "home")
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float | None]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in ((0, 1) if "preprocess" in cmd else (0,)):  # 1: a slide without tissue
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = TIMING.findall(proc.stdout + proc.stderr)
    return wall, float(found[-1]) if found else None


def _stop_server(env: dict[str, str], cwd: Path) -> None:
    subprocess.run([STAMP, "server", "--stop"], env=env, cwd=cwd, capture_output=True)


def _preprocess_config(root: Path, slides: Path, tag: str, um: float) -> Path:
    cfg = {
        "preprocessing": {
            "output_dir": str(root / f"features-{tag}"),
            "wsi_dir": str(slides),
            "extractor": "empty",
            "tile_size_um": um,
            "tile_size_px": 224,
            "max_workers": 2,
        }
    }
    path = root / f"preprocess-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _statistics_config(root: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    csvs = []
    for fold in range(5):
        folder = root / "preds" / f"split-{fold}"
        folder.mkdir(parents=True, exist_ok=True)
        y = rng.integers(0, 2, 60)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
        lines = ["PATIENT,isMSIH,pred,isMSIH_MSIH,isMSIH_nonMSIH,loss"]
        for i, (yy, pp) in enumerate(zip(y, p, strict=True)):
            label = "MSIH" if yy else "nonMSIH"
            pred = "MSIH" if pp >= 0.5 else "nonMSIH"
            lines.append(f"P{fold}{i:03d},{label},{pred},{pp:.4f},{1 - pp:.4f},0.5")
        (folder / "patient-preds.csv").write_text("\n".join(lines) + "\n")
        csvs.append(str(folder / "patient-preds.csv"))
    cfg = {
        "statistics": {
            "output_dir": str(root / "statistics"),
            "pred_csvs": csvs,
            "ground_truth_label": "isMSIH",
            "true_class": "MSIH",
        }
    }
    path = root / "statistics.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument(
        "--explicit-server",
        action="store_true",
        help="start `stamp server --background` before the warm rows (versions without the auto-started server)",
    )
    args = ap.parse_args()
    from stamp.synthetic import write_cohort

    root = args.keep or Path(tempfile.mkdtemp(prefix="stamp-startup-"))
    root.mkdir(parents=True, exist_ok=True)
    env = _env(root)
    rows: list[tuple[str, list[float], list[float | None]]] = []

    def measure(name: str, make_cmd, before=None, n: int = args.repeat) -> None:  # noqa: ANN001
        walls, flows = [], []
        for i in range(n):
            if before is not None:
                before(i)
            wall, flow = _run(make_cmd(i), env, root)
            walls.append(wall)
            flows.append(flow)
        rows.append((name, walls, flows))
        print(f"  {name}: {', '.join(f'{w:.2f}' for w in walls)}", file=sys.stderr, flush=True)

    try:
        write_cohort(root / "cohort", n_patients=6, seed=0, size=3072, variants=False)
        slides = root / "cohort" / "slides"
        chosen = sorted(p for p in slides.iterdir() if p.suffix == ".svs")[:6]
        six = root / "six-slides"
        six.mkdir(exist_ok=True)
        for p in chosen:
            if not (six / p.name).exists():
                os.link(p, six / p.name)
        stats_cfg = _statistics_config(root)
        # a first command migrates PREFECT_HOME (not measured: a one-off per machine)
        warm_cfg = _preprocess_config(root, six, "prime", 256.0)
        _run([STAMP, "-c", str(warm_cfg), "config"], env, root)
        _run([STAMP, "-v", "-c", str(warm_cfg), "preprocess"], env, root)
        _stop_server(env, root)

        measure("python -c 'import stamp' (floor)", lambda i: [sys.executable, "-c", "import stamp"])
        measure("stamp config", lambda i: [STAMP, "-c", str(warm_cfg), "config"])

        def cold_cfg(i: int) -> list[str]:
            return [STAMP, "-v", "-c", str(_preprocess_config(root, six, f"cold{i}", 256.0)), "preprocess"]

        measure("preprocess 6 slides 256 µm, cold", cold_cfg, before=lambda i: _stop_server(env, root))
        _run([STAMP, "-v", "-c", str(warm_cfg), "preprocess"], env, root)  # leaves a server running
        if args.explicit_server:
            _run([STAMP, "server", "--background"], env, root)

        def warm_cfg_for(um: float):  # noqa: ANN202
            return lambda i: [
                STAMP,
                "-v",
                "-c",
                str(_preprocess_config(root, six, f"warm{um:g}-{i}", um)),
                "preprocess",
            ]

        measure("preprocess 6 slides 256 µm, warm", warm_cfg_for(256.0))
        measure("preprocess 6 slides 64 µm, warm", warm_cfg_for(64.0))
        measure(
            "preprocess unchanged rerun, warm", lambda i: [STAMP, "-v", "-c", str(warm_cfg), "preprocess"]
        )
        measure("statistics 5 folds, warm", lambda i: [STAMP, "-v", "-c", str(stats_cfg), "statistics"])
        if not args.skip_demo:
            demo = root / "demo"
            _run([STAMP, "demo", "--out", str(demo)], env, root)
            measure("demo, cached rerun, warm", lambda i: [STAMP, "-v", "demo", "--out", str(demo)])
    finally:
        _stop_server(env, root)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    floor = min(rows[0][1])
    print(f"\n{'command':42s} {'best s':>7s} {'median':>7s} {'flow s':>7s} {'overhead':>8s} {'×floor':>7s}")
    for name, walls, flows in rows:
        best, med = min(walls), statistics.median(walls)
        known = [f for f in flows if f is not None]
        flow = statistics.median(known) if known else None
        over = f"{med - flow:8.2f}" if flow is not None else f"{'-':>8s}"
        flow_s = f"{flow:7.2f}" if flow is not None else f"{'-':>7s}"
        print(f"{name:42s} {best:7.2f} {med:7.2f} {flow_s} {over} {best / floor:7.1f}")


if __name__ == "__main__":
    main()
