"""Slow tier: SIGTERM and kill -9 in the middle of train, deploy, statistics and heatmaps.

Same contract as ``test_integrity_e2e`` (preprocess, crossval): SIGTERM exits within 10 s with
no temp file left; after either signal a rerun sweeps what was left and writes exactly the bytes an
uninterrupted run writes (compared file by file, or through the units' recorded digests).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from stamp.provenance import FOLDER_RECORD, read_record, record_path
from stamp.synthetic import write_cohort
from tests.conftest import leftover_temps
from tests.test_integrity_e2e import _assert_stopped, _env, _finish, _interrupt, _staging, _stamp, _write

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic slides with demo features (preprocessed in-process) and their tables."""
    from stamp.config_models import PreprocessingConfig
    from stamp_flows.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("stages")
    write_cohort(root, n_patients=8, seed=5, size=2560, variants=False)
    cfg = PreprocessingConfig(
        output_dir=root / "features", wsi_dir=root / "slides", extractor="demo", tile_size_um=128.0
    )
    result = run_preprocess(cfg, task_concurrency=2)
    assert result["counts"]["failed"] == 0
    return {
        "root": root,
        "slides": root / "slides",
        "features": Path(result["feature_dir"]),
        "clini": root / "clini.csv",
        "slide": root / "slide.csv",
    }


def _tables(c: dict[str, Path]) -> dict[str, Any]:
    return {"clini_table": str(c["clini"]), "slide_table": str(c["slide"]), "feature_dir": str(c["features"])}


def _train_config(c: dict[str, Path], out: Path) -> dict[str, Any]:
    return {
        "training": {"output_dir": str(out), **_tables(c), "ground_truth_label": "isMSIH",
                     "categories": ["MSIH", "nonMSIH"]},
        "advanced_config": {"model_name": "vit", "max_epochs": 25, "patience": 100, "batch_size": 2, "seed": 0},
    }  # fmt: skip


@pytest.fixture(scope="module")
def reference(cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """Uninterrupted train → deploy → statistics → heatmaps, each through the CLI, own result store."""
    ref = tmp_path_factory.mktemp("stages-ref")
    env = _env(ref, prefect_api, "results")
    for stage, config in _configs(cohort, ref, ref / "train" / "model.ckpt").items():
        _finish(_stamp(_write(ref / f"{stage}.yaml", config), stage, env))
    return ref


def _configs(c: dict[str, Path], base: Path, checkpoint: Path) -> dict[str, dict[str, Any]]:
    return {
        "train": _train_config(c, base / "train"),
        "deploy": {"deployment": {"output_dir": str(base / "deploy"), **_tables(c),
                                  "checkpoint_paths": [str(checkpoint)]}},
        "statistics": {"statistics": {"output_dir": str(base / "statistics"), "ground_truth_label": "isMSIH",
                                      "true_class": "MSIH", "pred_csvs": [str(base / "deploy" / "patient-preds.csv")]}},
        "heatmaps": {"heatmaps": {"output_dir": str(base / "heatmaps"), "feature_dir": str(c["features"]),
                                  "wsi_dir": str(c["slides"]), "checkpoint_path": str(checkpoint),
                                  "topk": 2, "bottomk": 1}},
    }  # fmt: skip


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _run_interrupted(stage: str, sig: int, ready: Any, base: Path, config: dict[str, Any], api: str) -> None:
    env = _env(base, api, "results")
    cfg = _write(base / f"{stage}.yaml", config)
    rc, seconds, text = _interrupt(_stamp(cfg, stage, env), ready, sig)
    _assert_stopped(sig, rc, seconds, text, base / stage)
    _finish(_stamp(cfg, stage, env))
    assert not leftover_temps(base / stage)


@SIGNALS
def test_train(sig: int, cohort: dict[str, Path], reference: Path, tmp_path: Path, prefect_api: str) -> None:
    out = tmp_path / "train"
    config = _configs(cohort, tmp_path, reference / "train" / "model.ckpt")["train"]
    _run_interrupted("train", sig, _staging(out, ".model.ckpt.stamp-tmp-*"), tmp_path, config, prefect_api)
    _same_files(out, reference / "train", ["model.ckpt", "training-metrics.csv"])


@SIGNALS
def test_deploy(sig: int, cohort: dict[str, Path], reference: Path, tmp_path: Path, prefect_api: str) -> None:
    out = tmp_path / "deploy"
    config = _configs(cohort, tmp_path, reference / "train" / "model.ckpt")["deploy"]

    def started() -> bool:  # the command logged its section: the run is under way, nothing published yet
        log = out / "logfile.log"
        return (
            log.is_file()
            and "stamp deploy with" in log.read_text()
            and not (out / "patient-preds.csv").exists()
        )

    _run_interrupted("deploy", sig, started, tmp_path, config, prefect_api)
    _same_files(out, reference / "deploy", ["patient-preds.csv"])


@SIGNALS
def test_statistics(
    sig: int, cohort: dict[str, Path], reference: Path, tmp_path: Path, prefect_api: str
) -> None:
    out = tmp_path / "statistics"
    config = _configs(cohort, tmp_path, reference / "train" / "model.ckpt")["statistics"]
    config["statistics"]["pred_csvs"] = [str(reference / "deploy" / "patient-preds.csv")]
    _run_interrupted(
        "statistics", sig, _staging(out, ".statistics-*.stamp-tmp-*"), tmp_path, config, prefect_api
    )
    unit = "statistics-classification-isMSIH"
    ours, theirs = (
        read_record(record_path(out, unit)),
        read_record(record_path(reference / "statistics", unit)),
    )
    assert ours is not None and theirs is not None and ours.key == theirs.key
    csvs = [n for n in theirs.outputs if n.endswith(".csv")]
    assert csvs and set(ours.outputs) == set(theirs.outputs)
    _same_files(out, reference / "statistics", csvs)


@SIGNALS
def test_heatmaps(
    sig: int, cohort: dict[str, Path], reference: Path, tmp_path: Path, prefect_api: str
) -> None:
    out = tmp_path / "heatmaps"
    config = _configs(cohort, tmp_path, reference / "train" / "model.ckpt")["heatmaps"]

    def mid() -> bool:  # one slide published, another being drawn
        return any(out.glob("*/" + FOLDER_RECORD)) and any(out.glob(".*.stamp-tmp-*"))

    _run_interrupted("heatmaps", sig, mid, tmp_path, config, prefect_api)
    folders = sorted(p.parent.name for p in (reference / "heatmaps").glob("*/" + FOLDER_RECORD))
    assert folders and sorted(p.parent.name for p in out.glob("*/" + FOLDER_RECORD)) == folders
    for name in folders:
        ours, theirs = (
            read_record(out / name / FOLDER_RECORD),
            read_record(reference / "heatmaps" / name / FOLDER_RECORD),
        )
        assert ours is not None and theirs is not None
        assert ours.outputs == theirs.outputs, f"{name}: files differ from the uninterrupted run"
