"""Cost of the provenance checks on a cached rerun of the demo (issue: goal < 5 % of the rerun).

1. ``stamp demo --out DIR`` (skipped when DIR already holds a finished demo), then the cached rerun
   ``stamp demo --out DIR`` timed as the floor (wall seconds of the whole command);
2. in this process, every check a cached rerun makes, over the same outputs: each slide's h5 unit
   (``serve_cached``), each fold folder, the statistics unit, each heatmaps folder and the cohort.

Prints both and their ratio. Usage: ``python bench/bench_provenance.py [--out DIR] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _demo(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "stamp.cli", "demo", "--out", str(out)], check=True, capture_output=True
    )
    return time.perf_counter() - t0


def _checks(out: Path) -> tuple[float, int]:
    from stamp.config import load_config
    from stamp.config_models import AdvancedConfig
    from stamp.hashing import shared_index
    from stamp.heatmaps import plan_heatmaps
    from stamp.heatmaps.render import check_heatmaps
    from stamp.modeling.crossval import check_fold, fold_dir, prepare_splits
    from stamp.modeling.stage import training_cohort
    from stamp.preprocessing import (
        feature_dir,
        h5_path_for,
        params_from_config,
        serve_cached,
        slide_provenance,
    )
    from stamp.slides import find_slides
    from stamp.statistics.api import check_statistics
    from stamp.synthetic import check_cohort
    from stamp_tasks.preprocess import PREPROCESS_CODE_VERSION, get_encoder

    cfg = load_config(out / "config.yaml")
    pre, cv, st, hm = cfg.preprocessing, cfg.crossval, cfg.statistics, cfg.heatmaps
    assert pre is not None and cv is not None and st is not None and hm is not None
    encoder = get_encoder(pre.extractor, None, "cpu")
    params, feat = params_from_config(pre), feature_dir(pre, PREPROCESS_CODE_VERSION)
    adv = cfg.advanced_config or AdvancedConfig()
    cohort = training_cohort(cv)
    splits = prepare_splits(cohort, Path(cv.output_dir), cv.n_splits, adv.seed)
    plan = plan_heatmaps(hm)
    settings = {"opacity": hm.opacity, "topk": hm.topk, "bottomk": hm.bottomk}
    settings.update(default_slide_mpp=hm.default_slide_mpp, ig_steps=hm.ig_steps)
    t0 = time.perf_counter()
    n, bad = 0, []
    for slide in find_slides(Path(pre.wsi_dir), pre.wsi_list):
        h5 = h5_path_for(slide, Path(pre.wsi_dir), feat)
        if not h5.exists():
            continue
        expected = slide_provenance(
            shared_index().sha256(slide), params, encoder.weights_sha256, PREPROCESS_CODE_VERSION
        )
        n += 1
        if serve_cached({"h5": str(h5)}, slide, h5, expected) is not None:
            bad.append(str(h5))
    for i, split in enumerate(splits):
        n += 1
        if not check_fold(cohort, split, fold_dir(Path(cv.output_dir), i), adv, cv.patient_label).reusable:
            bad.append(f"split-{i}")
    files = sorted(p for p in Path(st.output_dir).rglob("*") if p.is_file() and not p.name.startswith("."))
    n += 1
    if not check_statistics(st, [f for f in files if f.name != "logfile.log"]).reusable:
        bad.append("statistics")
    for job in plan:
        n += 1
        if not check_heatmaps(job, hm.checkpoint_path, **settings).reusable:
            bad.append(job.name)
    n += 1
    check_cohort(out / "cohort", 32, 0)
    seconds = time.perf_counter() - t0
    if bad:
        print(f"not reusable (run the demo again first?): {bad[:5]}", file=sys.stderr)
    return seconds, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("stamp-demo"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (args.out / "config.yaml").is_file():
        print(f"first demo run: {_demo(args.out):.1f} s")
    _demo(args.out)  # make sure everything is cached
    walls = [_demo(args.out) for _ in range(args.repeat)]
    checks = [_checks(args.out) for _ in range(args.repeat)]
    wall = min(walls)
    secs, n = min(c[0] for c in checks), checks[0][1]
    print("| measure | seconds | ratio to the cached rerun |\n|---|---|---|")
    print(f"| cached `stamp demo` rerun (floor, wall) | {wall:.2f} | 1.000 |")
    print(f"| provenance checks ({n} units) | {secs:.3f} | {secs / wall:.3f} |")


if __name__ == "__main__":
    main()
