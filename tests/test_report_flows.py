"""The statistics and heatmaps flows and commands on a real (test) Prefect API: artifacts, cache, errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stamp.cli import main

pytestmark = pytest.mark.usefixtures("prefect_api")


def artifacts(key: str) -> list:
    """Artifacts with ``key`` on the current Prefect API (newest first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def _read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
            )

    return asyncio.run(_read())


def run_stamp(*args: str) -> tuple[int, list[str]]:
    """Run ``stamp`` in a subprocess (the user's path); return its exit status and error lines.

    Fails if a traceback reached the terminal.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "stamp.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.startswith("stamp: ")]


def write_fold_preds(root: Path, folds: int = 3, n: int = 40, seed: int = 0) -> list[Path]:
    """``split-<i>/patient-preds.csv`` files as crossval writes them (classification isMSIH)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(folds):
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + 0.35 * (1 - 2 * y) + rng.normal(0, 0.2, n), 0.01, 0.99)  # P(MSIH)... flipped below
        p_msih = 1 - p
        df = pd.DataFrame(
            {
                "PATIENT": [f"F{i}P{k:03d}" for k in range(n)],
                "isMSIH": np.where(y == 0, "MSIH", "nonMSIH"),
                "pred": np.where(p_msih >= 0.5, "MSIH", "nonMSIH"),
                "isMSIH_MSIH": p_msih,
                "isMSIH_nonMSIH": 1 - p_msih,
                "loss": 0.0,
            }
        )
        path = root / f"split-{i}" / "patient-preds.csv"
        path.parent.mkdir(parents=True)
        df.to_csv(path, index=False)
        paths.append(path)
    return paths


def test_statistics_command_writes_stamp_files_artifacts_and_caches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.metrics import roc_auc_score

    csvs = write_fold_preds(tmp_path / "crossval")
    out = tmp_path / "stats"
    cfg = tmp_path / "config.yaml"
    section = {
        "output_dir": str(out),
        "pred_csvs": [str(p) for p in csvs],
        "ground_truth_label": "isMSIH",
        "true_class": "MSIH",
    }
    cfg.write_text(yaml.safe_dump({"statistics": section}))
    assert main(["-c", str(cfg), "statistics"]) == 0
    printed = capsys.readouterr().out
    assert "statistics:" in printed and str(out) in printed
    table = pd.read_csv(out / "isMSIH_categorical-stats_individual.csv")
    first = pd.read_csv(csvs[0])
    expected = roc_auc_score(first["isMSIH"] == "MSIH", first["isMSIH_MSIH"])
    row = table[(table["class"] == "MSIH") & table["source"].str.startswith("split-0")]
    assert row["roc_auc_score"].iloc[0] == pytest.approx(expected, abs=1e-12)
    assert (out / "roc-curve_isMSIH=MSIH.png").stat().st_size > 1000
    assert (out / "logfile.log").exists()
    metrics = artifacts("statistics-metrics")
    plots = artifacts("statistics-plots")
    assert metrics and plots and "data:image/png;base64," in plots[0].data
    from stamp.hashing import file_sha256

    for csv in csvs:  # the report names every prediction file it used, with its digest
        assert f"| `{csv.resolve()}` | `{file_sha256(csv)[:16]}` |" in plots[0].data

    mtime = (out / "roc-curve_isMSIH=MSIH.png").stat().st_mtime_ns
    assert main(["-c", str(cfg), "statistics"]) == 0
    assert (out / "roc-curve_isMSIH=MSIH.png").stat().st_mtime_ns == mtime, "unchanged inputs: cached"
    (out / "roc-curve_isMSIH=MSIH.png").unlink()
    assert main(["-c", str(cfg), "statistics"]) == 0
    assert (out / "roc-curve_isMSIH=MSIH.png").exists(), "a deleted output is recomputed"
    table_csv = out / "isMSIH_categorical-stats_individual.csv"
    table_csv.write_text(table_csv.read_text().replace("split-0", "edited"))
    assert main(["-c", str(cfg), "statistics"]) == 0
    assert "edited" not in table_csv.read_text(), "an edited output is not served from the cache"


def test_statistics_bad_input_is_one_line(tmp_path: Path) -> None:
    csvs = write_fold_preds(tmp_path / "cv", folds=1)
    cfg = tmp_path / "config.yaml"
    section = {"output_dir": str(tmp_path / "s"), "pred_csvs": [str(csvs[0]), str(tmp_path / "gone.csv")]}
    cfg.write_text(yaml.safe_dump({"statistics": {**section, "ground_truth_label": "isMSIH"}}))
    status, err = run_stamp("-c", str(cfg), "statistics")
    assert status == 1
    assert len(err) == 1 and "gone.csv" in err[0]

    cfg.write_text(
        yaml.safe_dump({"statistics": {**section, "pred_csvs": [str(csvs[0])], "ground_truth_label": "nope"}})
    )
    status, err = run_stamp("-c", str(cfg), "statistics")
    assert status == 1
    assert len(err) == 1 and "nope" in err[0] and "patient-preds.csv" in err[0]


def test_heatmaps_command_fans_out_per_slide_and_one_bad_slide_fails_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stamp.synthetic import SlideSpec, write_slide
    from tests.test_heatmaps import MPP, H, W, _grid_features, _h5, _linear_ckpt

    truth = write_slide(tmp_path / "wsi" / "a" / "good.svs", SlideSpec(width=W, height=H, mpp=MPP, seed=4))
    write_slide(tmp_path / "wsi" / "b" / "bad.svs", SlideSpec(width=W, height=H, mpp=MPP, seed=5))
    coords, feats, _ = _grid_features(truth)
    _h5(tmp_path / "feats" / "a" / "good.h5", coords, feats)
    _h5(tmp_path / "feats" / "b" / "bad.h5", coords, feats[:, :5])  # wrong feature dimension
    ckpt = _linear_ckpt(tmp_path / "model.ckpt")
    out = tmp_path / "heatmaps"
    section = {
        "output_dir": str(out),
        "feature_dir": str(tmp_path / "feats"),
        "wsi_dir": str(tmp_path / "wsi"),
        "checkpoint_path": str(ckpt),
        "topk": 2,
        "bottomk": 1,
        "device": "cpu",
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"heatmaps": section}))
    assert main(["-c", str(cfg), "heatmaps"]) == 1, "a failed slide makes the command exit 1"
    printed = capsys.readouterr().out
    assert "failed: b/bad" in printed and "5-dim features" in printed
    overview = out / "a" / "good" / "plots" / "overview-good.png"
    assert overview.is_file() and len(list((out / "a" / "good" / "tiles").glob("top_*.jpg"))) == 2
    assert not (out / "b").exists(), "nothing partial for the failed slide"
    rows = artifacts("heatmaps-slides")[0].data
    assert "b/bad" in rows and "failed" in rows and "a/good" in rows
    assert "data:image/png;base64," in artifacts("heatmaps-gallery")[0].data

    mtime = overview.stat().st_mtime_ns
    assert main(["-c", str(cfg), "heatmaps"]) == 1
    assert overview.stat().st_mtime_ns == mtime, "an unchanged slide comes from the cache"


def test_heatmaps_rerun_serves_up_to_date_folders_without_a_task(tmp_path: Path) -> None:
    """An unchanged slide's heatmaps come back from its folder (summary + record) with no task run; a
    folder whose summary was edited is not served that way: its task runs and the folder is redrawn."""
    from stamp.heatmaps.render import SUMMARY_NAME
    from stamp.synthetic import SlideSpec, write_slide
    from stamp_flows.heatmaps import heatmaps_flow
    from tests.test_heatmaps import MPP, H, W, _grid_features, _h5, _linear_ckpt
    from tests.test_preprocess_flow import _task_runs

    for name, seed in (("one", 6), ("two", 7)):
        truth = write_slide(
            tmp_path / "wsi" / f"{name}.svs", SlideSpec(width=W, height=H, mpp=MPP, seed=seed)
        )
        coords, feats, _ = _grid_features(truth)
        _h5(tmp_path / "feats" / f"{name}.h5", coords, feats)
    section = {
        "output_dir": str(tmp_path / "heatmaps"),
        "feature_dir": str(tmp_path / "feats"),
        "wsi_dir": str(tmp_path / "wsi"),
        "checkpoint_path": str(_linear_ckpt(tmp_path / "model.ckpt")),
        "topk": 2,
        "device": "cpu",
    }
    first = heatmaps_flow(section)
    assert first["failed"] == 0 and len(first["slides"]) == 2
    before = _task_runs("heatmap-")
    second = heatmaps_flow(section)
    assert _task_runs("heatmap-") == before, "an up-to-date folder must not start a task"

    def drawn(result: dict) -> dict:  # top tiles, scores, paths: all but the time taken
        return {s["slide"]: {k: v for k, v in s.items() if k != "seconds"} for s in result["slides"]}

    by_slide = drawn(first)
    assert drawn(second) == by_slide
    assert all(Path(s["overview"]).is_file() for s in second["slides"])

    summary = tmp_path / "heatmaps" / "one" / SUMMARY_NAME
    forged = json.loads(summary.read_text()) | {"n_tiles": 1, "predicted": "forged"}
    summary.write_text(json.dumps(forged))
    third = heatmaps_flow(section)
    new = _task_runs("heatmap-")
    for name in before:
        new.remove(name)
    assert new and set(new) == {"heatmap-one"}, "exactly the edited slide runs its task"
    assert {s["slide"]: s["n_tiles"] for s in third["slides"]} == {
        k: v["n_tiles"] for k, v in by_slide.items()
    }
    assert "forged" not in summary.read_text()
