"""Cross-validation: patient-level folds, splits.json written once and reused, per-fold outputs,
skipping finished folds, and identical results for the same seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from stamp.modeling import crossval
from stamp.modeling.crossval import SPLITS_NAME, fold_dir, make_splits, prepare_splits, run_crossval, run_fold
from tests.test_modeling_train import LABEL, POS, Tiny, tiny_advanced, tiny_cohort, write_tiny_cohort

# tiny models on 2 shared cores: one intra-op thread is ~10x faster than spinning two
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return write_tiny_cohort(tmp_path_factory.mktemp("tiny-cv"), n_patients=24)


def test_splits_are_patient_level_stratified_and_seeded(tiny: Tiny) -> None:
    cohort = tiny_cohort(tiny)
    splits = make_splits(cohort, 3, 7)
    ids = sorted(p.id for p in cohort.patients)
    label = {p.id: p.target for p in cohort.patients}
    tests = [s["test_patients"] for s in splits]
    assert sorted(sum(tests, [])) == ids  # every patient tested exactly once
    for s in splits:
        assert sorted(s["train_patients"] + s["test_patients"]) == ids
        assert sum(label[p] == POS for p in s["test_patients"]) == 4  # 12 positives / 3 folds
    assert make_splits(cohort, 3, 7) == splits
    assert make_splits(cohort, 3, 8) != splits
    assert make_splits(cohort, 3, None) == make_splits(cohort, 3, 0)  # STAMP's random_state 0
    survival = make_splits(tiny_cohort(tiny, "survival"), 3, 0)
    assert sorted(sum((s["test_patients"] for s in survival), [])) == ids
    regression = make_splits(tiny_cohort(tiny, "regression", "TMB"), 4, 0)  # KFold
    assert [len(s["test_patients"]) for s in regression] == [6, 6, 6, 6]


def test_crossval_writes_splits_and_fold_outputs_and_skips_finished_folds(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stamp_log: pytest.LogCaptureFixture
) -> None:
    cohort = tiny_cohort(tiny)
    advanced = tiny_advanced("abmil", max_epochs=2)
    paths = run_crossval(cohort, tmp_path, n_splits=3, advanced=advanced)
    splits = json.loads((tmp_path / SPLITS_NAME).read_text())["splits"]
    assert len(splits) == 3 and set(splits[0]) == {"train_patients", "test_patients"}
    for i, path in enumerate(paths):
        assert path == tmp_path / f"split-{i}" / "patient-preds.csv"
        assert (tmp_path / f"split-{i}" / "model.ckpt").is_file()
        preds = pd.read_csv(path)
        assert sorted(preds["PATIENT"]) == sorted(splits[i]["test_patients"])
        meta = torch.load(tmp_path / f"split-{i}" / "model.ckpt", weights_only=True)["meta"]
        assert set(meta["train_patients"]) | set(meta["valid_patients"]) == set(splits[i]["train_patients"])
        assert not set(meta["valid_patients"]) & set(splits[i]["test_patients"])  # never the test fold
    before = [p.stat().st_mtime_ns for p in paths]

    def no_training(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(crossval, "train_model", no_training)
    assert run_crossval(cohort, tmp_path, n_splits=3, advanced=advanced) == paths
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert "finished with the same provenance; reusing it" in stamp_log.text
    # predictions gone, checkpoint kept: the checkpoint is reused, not retrained
    paths[1].unlink()
    assert run_fold(cohort, splits[1], fold_dir(tmp_path, 1), advanced, 0) == paths[1]
    assert paths[1].is_file()


def test_splits_json_is_reused_and_checked(
    tiny: Tiny, tmp_path: Path, stamp_log: pytest.LogCaptureFixture
) -> None:
    cohort = tiny_cohort(tiny)
    ids = sorted(p.id for p in cohort.patients)
    custom = {"splits": [{"train_patients": ids[:12], "test_patients": ids[12:20]},
                         {"train_patients": ids[8:20], "test_patients": ids[:8]}]}  # fmt: skip
    (tmp_path / SPLITS_NAME).write_text(json.dumps(custom))
    splits = prepare_splits(cohort, tmp_path, 2, 0)
    assert splits == custom["splits"]  # reused as written
    assert "4 usable patient(s) are in no split" in stamp_log.text and ids[-1] in stamp_log.text
    custom["splits"][0]["test_patients"].append("GHOST-1")
    (tmp_path / SPLITS_NAME).write_text(json.dumps(custom))
    with pytest.raises(ValueError, match=r"splits.json: 1 patient\(s\) .*GHOST-1"):
        prepare_splits(cohort, tmp_path, 2, 0)
    (tmp_path / SPLITS_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid splits file"):
        prepare_splits(cohort, tmp_path, 2, 0)


def test_same_seed_gives_identical_splits_and_predictions(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny, "survival")
    advanced = tiny_advanced("vit", max_epochs=2, seed=11)
    a = run_crossval(cohort, tmp_path / "a", n_splits=2, advanced=advanced)
    b = run_crossval(cohort, tmp_path / "b", n_splits=2, advanced=advanced)
    assert (tmp_path / "a" / SPLITS_NAME).read_bytes() == (tmp_path / "b" / SPLITS_NAME).read_bytes()
    for pa, pb in zip(a, b, strict=True):
        pd.testing.assert_frame_equal(pd.read_csv(pa), pd.read_csv(pb), check_exact=False, atol=1e-6, rtol=0)


def test_label_with_slash_and_spaces(tmp_path: Path) -> None:
    label = "MSI/H status"
    tiny = write_tiny_cohort(tmp_path / "c", n_patients=16, label=label, classes=("MSI H", "MS/S"))
    cohort = tiny_cohort(tiny, label=label)
    (path,) = run_crossval(
        cohort, tmp_path / "cv", n_splits=2, advanced=tiny_advanced("abmil", max_epochs=1)
    )[:1]
    cols = list(pd.read_csv(path).columns)
    assert cols == ["PATIENT", label, "pred", f"{label}_MS/S", f"{label}_MSI H", "loss"]
    assert LABEL not in cols


# ----------------------------------------------------------------------------------- acceptance (slow)


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 synthetic patients (planted biomarker) encoded with the weight-free demo encoder."""
    from stamp.encoders import load_encoder
    from stamp.preprocessing import PreprocessParams, extract_slide
    from stamp.synthetic import write_cohort

    root = tmp_path_factory.mktemp("demo-cohort")
    info = write_cohort(root, n_patients=60, seed=0, size=4096, variants=False)
    encoder = load_encoder("demo")
    params = PreprocessParams(extractor="demo")
    for rec in info.slides:
        extract_slide(rec.truth.slide_path, root / "features" / rec.filename, params, encoder)
    return root


def _pooled(paths: list[Path], task: str) -> float:
    from stamp.modeling.metrics import auroc, concordance_index, pearson_r

    df = pd.concat([pd.read_csv(p) for p in paths])
    if task == "classification":
        y = (df["isMSIH"] == "MSIH").astype(int).to_numpy()
        return auroc(y, df[["isMSIH_nonMSIH", "isMSIH_MSIH"]].to_numpy())
    if task == "regression":
        return pearson_r(df["TMB"].to_numpy(), df["pred"].to_numpy())
    return concordance_index(df["OS_time"].to_numpy(), df["pred_score"].to_numpy(), df["OS_event"].to_numpy())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "model", "batch_size", "floor"),
    [
        ("classification", "vit", 64, 0.90),
        ("classification", "abmil", 64, 0.90),
        # ~36 training patients per fold: batch 64 gives one optimiser step per epoch, too few for
        # a regression head to reach the targets' scale (per-fold r stays high, pooled r does not)
        ("regression", "abmil", 8, 0.70),
        ("survival", "abmil", 64, 0.70),
    ],
)
def test_demo_cohort_crossval_reaches_the_acceptance_figures(
    demo_cohort: Path, tmp_path: Path, task: str, model: str, batch_size: int, floor: float
) -> None:
    from stamp.cohort import load_cohort
    from stamp.config_models import AdvancedConfig

    all_labels: dict[str, dict[str, Any]] = {
        "classification": {"ground_truth_label": "isMSIH"},
        "regression": {"ground_truth_label": "TMB"},
        "survival": {"ground_truth_label": None, "time_label": "OS_time", "status_label": "OS_event"},
    }
    labels = all_labels[task]
    cohort = load_cohort(task=task, clini_table=demo_cohort / "clini.csv", slide_table=demo_cohort / "slide.csv",  # type: ignore[arg-type]
                         feature_dir=demo_cohort / "features", **labels)  # fmt: skip
    advanced = AdvancedConfig.model_validate(
        {"model_name": model, "batch_size": batch_size, "num_workers": 0, "seed": 0, "accelerator": "cpu"}
    )
    paths = run_crossval(cohort, tmp_path, n_splits=5, advanced=advanced)
    assert _pooled(paths, task) >= floor


def test_crossval_and_statistics_give_the_same_interval_for_the_same_folds() -> None:
    """One t-interval (issue #12): the crossval summary's CI is the statistics stage's, clipped alike."""
    from stamp.modeling.stage import mean_ci
    from stamp.statistics.bootstrap import t_interval

    folds = [0.99, 1.0, 0.62, 1.0, 0.97]
    assert mean_ci(folds, key="auroc_isMSIH") == t_interval(folds, bounds=(0.0, 1.0))
    assert mean_ci(folds, key="auroc_isMSIH")[2] == 1.0, "an AUROC interval never passes 1"
    assert mean_ci([0.3, None, 0.5], key="pearson_r")[0] == 0.4  # type: ignore[list-item]
