"""Deployment: STAMP's patient-preds columns per task, ensembles with mean and spread, checkpoint
agreement, the data-leakage warning, cohorts without ground truth and STAMP-written h5 files."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stamp.cohort import CohortData, load_cohort
from stamp.modeling.checkpoint import CheckpointError
from stamp.modeling.deploy import deploy, deployment_spec, predict
from stamp.modeling.train import inner_split, train_model
from tests.test_modeling_train import LABEL, NEG, POS, Tiny, tiny_advanced, tiny_cohort, write_tiny_cohort

# tiny models on 2 shared cores: one intra-op thread is ~10x faster than spinning two
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return write_tiny_cohort(tmp_path_factory.mktemp("tiny-deploy"), n_patients=24)


def _fit(
    cohort: CohortData, out: Path, model: str = "abmil", seed: int = 0, patients: int | None = None
) -> Path:
    pts = cohort.patients[:patients] if patients else cohort.patients
    train, valid = inner_split(pts, cohort, seed)
    advanced = tiny_advanced(model, max_epochs=2, seed=seed)
    return train_model(train, valid, cohort, advanced=advanced, output_dir=out, seed=seed)


@pytest.fixture(scope="module")
def models(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return {
            "cls0": _fit(tiny_cohort(tiny), out / "cls0", seed=0, patients=16),
            "cls1": _fit(tiny_cohort(tiny), out / "cls1", seed=1, patients=16),
            "reg": _fit(tiny_cohort(tiny, "regression", "TMB"), out / "reg", patients=16),
            "surv0": _fit(tiny_cohort(tiny, "survival"), out / "surv0", model="vit", patients=16),
            "surv1": _fit(tiny_cohort(tiny, "survival"), out / "surv1", model="vit", seed=1, patients=16),
            "multi": _fit(
                tiny_cohort(tiny, "classification", [LABEL, "grade"]), out / "multi", model="barspoon"
            ),
        }


def _unseen(cohort: CohortData) -> CohortData:
    """The 8 patients none of the 16-patient models saw."""
    cohort.patients = cohort.patients[16:]
    return cohort


def test_classification_columns_and_loss(tiny: Tiny, models: dict[str, Path], tmp_path: Path) -> None:
    (path,) = deploy([models["cls0"]], _unseen(tiny_cohort(tiny)), tmp_path)
    assert path == tmp_path / "patient-preds.csv" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".patient-preds.csv.provenance.json",
        path.name,
    ]
    df = pd.read_csv(path)
    assert list(df.columns) == ["PATIENT", LABEL, "pred", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "loss"]
    true_prob = np.where(df[LABEL] == POS, df[f"{LABEL}_{POS}"], df[f"{LABEL}_{NEG}"])
    np.testing.assert_allclose(df["loss"], -np.log(true_prob), rtol=1e-5)  # CE of the probabilities, once
    assert df["loss"].is_monotonic_increasing
    assert (df["pred"] == np.where(df[f"{LABEL}_{POS}"] > df[f"{LABEL}_{NEG}"], POS, NEG)).all()


def test_regression_and_multi_target_columns(tiny: Tiny, models: dict[str, Path], tmp_path: Path) -> None:
    (reg,) = deploy([models["reg"]], _unseen(tiny_cohort(tiny, "regression", "TMB")), tmp_path / "reg")
    assert list(pd.read_csv(reg).columns) == ["PATIENT", "TMB", "pred", "loss"]
    (multi,) = deploy(
        [models["multi"]], tiny_cohort(tiny, "classification", [LABEL, "grade"]), tmp_path / "m"
    )
    assert list(pd.read_csv(multi).columns) == [
        "PATIENT", LABEL, "grade", f"pred_{LABEL}", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "pred_grade", "grade_G1",
        "grade_G2", "loss",
    ]  # fmt: skip


def test_survival_ensemble_has_mean_and_spread(tiny: Tiny, models: dict[str, Path], tmp_path: Path) -> None:
    cohort = _unseen(tiny_cohort(tiny, "survival"))
    paths = deploy([models["surv0"], models["surv1"]], cohort, tmp_path)
    assert [p.name for p in paths] == ["patient-preds-0.csv", "patient-preds-1.csv", "patient-preds.csv"]
    m0, m1, ens = (pd.read_csv(p) for p in paths)
    cut = [c for c in m0.columns if c.startswith("cut_off=")]
    assert list(m0.columns) == ["PATIENT", "pred_score", "OS_time", "OS_event", *cut] and len(cut) == 1
    assert list(ens.columns)[:5] == ["PATIENT", "pred_score", "OS_time", "OS_event", "std_pred_score"]
    assert ens.columns[-1].startswith("cut_off=")
    np.testing.assert_allclose(ens["pred_score"], (m0["pred_score"] + m1["pred_score"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        ens["std_pred_score"], (m0["pred_score"] - m1["pred_score"]).abs() / 2, rtol=1e-5
    )


def test_classification_ensemble(tiny: Tiny, models: dict[str, Path]) -> None:
    result = predict([models["cls0"], models["cls1"]], _unseen(tiny_cohort(tiny)))
    assert result.ensemble is not None and len(result.per_model) == 2
    a, b = (df.set_index("PATIENT").sort_index() for df in result.per_model)
    ens = result.ensemble.set_index("PATIENT").sort_index()
    col = f"{LABEL}_{POS}"
    np.testing.assert_allclose(ens[col], (a[col] + b[col]) / 2, rtol=1e-6)
    np.testing.assert_allclose(ens[f"std_{col}"], (a[col] - b[col]).abs() / 2, rtol=1e-5, atol=1e-9)
    assert list(ens.columns)[:5] == [LABEL, "pred", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "loss"]


def test_mismatched_checkpoints_are_refused(tiny: Tiny, models: dict[str, Path]) -> None:
    with pytest.raises(
        ValueError, match=r"checkpoints disagree on task: .*cls0.*'classification'.*reg.*'regression'"
    ):
        predict([models["cls0"], models["reg"]], tiny_cohort(tiny))
    with pytest.raises(ValueError, match="checkpoints disagree on targets"):
        deployment_spec([models["cls0"], models["multi"]])


def test_leakage_is_reported_critically(
    tiny: Tiny, models: dict[str, Path], stamp_log: pytest.LogCaptureFixture
) -> None:
    cohort = tiny_cohort(tiny)
    predict([models["cls0"]], cohort)
    critical = [r for r in stamp_log.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "DATA LEAKAGE DETECTED" in critical[0].getMessage()
    assert "P000" in critical[0].getMessage() and "P023" not in critical[0].getMessage()
    stamp_log.clear()
    predict([models["cls0"]], _unseen(tiny_cohort(tiny)))
    assert not [r for r in stamp_log.records if r.levelno == logging.CRITICAL]


def test_deploy_without_ground_truth(tiny: Tiny, models: dict[str, Path], tmp_path: Path) -> None:
    spec = deployment_spec([models["cls0"]])
    assert spec["task"] == "classification" and spec["ground_truth_label"] == LABEL
    cohort = load_cohort(task="classification", clini_table=None, slide_table=tiny.slides, feature_dir=tiny.features,
                         ground_truth_label=None, require_targets=False)  # fmt: skip
    (path,) = deploy([models["cls0"]], cohort, tmp_path)
    df = pd.read_csv(path)
    assert list(df.columns) == ["PATIENT", LABEL, "pred", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "loss"]
    assert df[LABEL].isna().all() and df["loss"].isna().all() and len(df) == 24


def test_wrong_feature_level_and_lightning_checkpoint(
    tiny: Tiny, models: dict[str, Path], tmp_path: Path
) -> None:
    slides = write_tiny_cohort(tmp_path / "slide", n_patients=4, level="slide")
    with pytest.raises(ValueError, match="tile-level model cannot take slide-level features"):
        predict([models["cls0"]], tiny_cohort(slides, require_targets=False))
    torch.save({"pytorch-lightning_version": "2.5.1", "state_dict": {}}, tmp_path / "stamp.ckpt")
    with pytest.raises(CheckpointError, match="STAMP .*Lightning.* not supported"):
        predict([tmp_path / "stamp.ckpt"], tiny_cohort(tiny))


def test_stamp_written_h5_files_train_and_deploy(tmp_path: Path) -> None:
    tiny = write_tiny_cohort(tmp_path / "stamp", n_patients=16, stamp_layout=True)
    cohort = tiny_cohort(tiny)
    ckpt = _fit(cohort, tmp_path / "model", model="vit")
    (path,) = deploy([ckpt], cohort, tmp_path / "deploy")
    df = pd.read_csv(path)
    assert len(df) == 16 and not df["loss"].isna().any()
    assert deployment_spec([ckpt])["extractor"] == "ctranspath"
    assert not math.isnan(df[f"{LABEL}_{POS}"].sum())
