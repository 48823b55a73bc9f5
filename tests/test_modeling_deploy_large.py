"""Deploy a 200,000-tile bag through the whole deploy path on CPU with bounded memory (slow tier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stamp.features import write_tile_features
from tests.conftest import REPO_ROOT
from tests.test_modeling_train import LABEL, tiny_advanced, tiny_cohort, write_tiny_cohort

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from stamp.cohort import load_cohort
from stamp.modeling.deploy import deploy, deployment_spec
ckpt, feat_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
spec = deployment_spec([ckpt])
cohort = load_cohort(task=spec["task"], clini_table=None, slide_table=feat_dir / "slide.csv", feature_dir=feat_dir,
                     ground_truth_label=None, categories=spec["categories"], require_targets=False)
t = time.perf_counter()
files = deploy([ckpt], cohort, out)
print(json.dumps({"files": [str(f) for f in files], "seconds": time.perf_counter() - t,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_200k_tile_bag_deploys_within_memory(tmp_path: Path) -> None:
    from stamp.modeling.checkpoint import load_meta
    from stamp.modeling.crossval import inner_split
    from stamp.modeling.train import train_model

    tiny = write_tiny_cohort(tmp_path / "train", n_patients=16)
    cohort = tiny_cohort(tiny)
    train, valid = inner_split(cohort.patients, cohort, 0)
    adv = tiny_advanced("vit", max_epochs=1)
    adv.model_params.vit.n_layers = 2  # the first block attends over all 200k tiles (exact, query-chunked)
    ckpt = train_model(train, valid, cohort, advanced=adv, output_dir=tmp_path, seed=0)
    assert load_meta(ckpt)["model_params"]["n_layers"] == 2

    big = tmp_path / "big"
    n, side = 200_000, 448
    rng = np.random.default_rng(0)
    coords = np.stack(np.divmod(np.arange(n), side)[::-1], axis=1).astype(np.float32) * 256.0
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    write_tile_features(big / "HUGE.h5", feats, coords, extractor="synthetic", tile_size_um=256.0,
                        tile_size_px=224, code_hash="test")  # fmt: skip
    (big / "slide.csv").write_text("PATIENT,FILENAME\nHUGE,HUGE.h5\n")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ckpt), str(big), str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1700,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"200k-tile deploy: {result['seconds']:.1f} s, peak RSS {result['peak_gib']:.2f} GiB")
    assert result["peak_gib"] < 8.0
    preds = Path(result["files"][-1]).read_text().splitlines()
    assert preds[0].startswith(f"PATIENT,{LABEL}") and preds[1].startswith("HUGE,")
