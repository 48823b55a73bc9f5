"""Acceptance figures of the modeling stage on a synthetic cohort (not a test; prints a table).

    python bench/crossval_synthetic.py --patients 40 --model vit --task classification [--max-lr 1e-4]

Writes the cohort, preprocesses it with the weight-free demo encoder and runs 5-fold crossval (small models, sized
for 2 CPU cores) through the real flows on a temporary Prefect API, then prints the per-metric mean and 95 % CI.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Parse arguments, run the stages, print the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--model", default="vit", choices=["vit", "abmil", "trans_mil", "mlp"])
    ap.add_argument("--task", default="classification", choices=["classification", "regression", "survival"])
    ap.add_argument("--max-lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")

    from prefect.testing.utilities import prefect_test_harness

    from stamp.config_models import AdvancedConfig, CrossvalConfig, PreprocessingConfig
    from stamp.synthetic import write_cohort

    root = args.out or Path(tempfile.mkdtemp(prefix="stamp-cv-"))
    t0 = time.perf_counter()
    write_cohort(root / "cohort", n_patients=args.patients, seed=0, size=4096, variants=False)
    t1 = time.perf_counter()
    with prefect_test_harness(180):
        from stamp_flows.modeling import run_crossval_flow
        from stamp_flows.preprocess import run_preprocess

        pre_cfg = PreprocessingConfig(
            output_dir=root / "features", wsi_dir=root / "cohort" / "slides", extractor="demo", max_workers=2
        )
        pre = run_preprocess(pre_cfg, 2)
        t2 = time.perf_counter()
        labels = {
            "classification": {"ground_truth_label": "isMSIH"},
            "regression": {"ground_truth_label": "TMB"},
            "survival": {"time_label": "OS_time", "status_label": "OS_event"},
        }[args.task]
        sec = CrossvalConfig(
            task=args.task,
            output_dir=root / f"cv-{args.model}-{args.task}",
            clini_table=root / "cohort" / "clini.csv",
            slide_table=root / "cohort" / "slide.csv",
            feature_dir=pre["feature_dir"],
            n_splits=5,
            **labels,
        )
        adv = AdvancedConfig(
            seed=42,
            model_name=args.model,
            max_epochs=args.epochs,
            patience=6,
            batch_size=8,
            num_workers=0,
            max_lr=args.max_lr,
            model_params={
                "vit": {"dim_model": 128, "dim_feedforward": 256, "n_heads": 4},
                "abmil": {"dim_hidden": 128},
            },
        )
        result = run_crossval_flow(sec, adv)
    t3 = time.perf_counter()
    print(f"{args.patients} patients, {args.model}, {args.task}: synth {t1 - t0:.1f} s, "
          f"preprocess {t2 - t1:.1f} s, crossval {t3 - t2:.1f} s")  # fmt: skip
    print(result["summary"])


if __name__ == "__main__":
    main()
