"""The mean-pool baseline: fits per task, sits beside every crossval fold, and shows in the statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stamp.config_models import CrossvalConfig, StatisticsConfig
from stamp.modeling.baseline import BASELINE_PREDS_NAME, _cox_loss_grad, fit_baseline
from stamp.modeling.crossval import make_splits, run_crossval
from stamp.modeling.metrics import auroc, concordance_index, pearson_r
from stamp.modeling.planted import PlantedCohort, write_planted_cohort
from stamp.modeling.stage import baseline_comparison, fold_metrics, training_cohort
from tests.test_modeling_train import tiny_advanced

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cohort(root: Path, task: str, n: int = 40) -> PlantedCohort:
    return write_planted_cohort(root, n_patients=n, task=task, signal="mean", dim=32, tiles=(30, 60), seed=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PlantedCohort]:
    root = tmp_path_factory.mktemp("planted")
    return {task: _cohort(root / task, task) for task in ("classification", "regression", "survival")}


def _load(pc: PlantedCohort, out: Path) -> object:
    return training_cohort(CrossvalConfig(output_dir=out, **pc.section))


def test_planted_cohort_is_stamp_layout(planted: dict[str, PlantedCohort]) -> None:
    import h5py

    pc = planted["classification"]
    files = sorted(pc.feature_dir.glob("*.h5"))
    assert len(files) == 40 + 8  # every fifth patient has two slides
    with h5py.File(files[0]) as h5:
        assert h5["feats"].dtype == np.float16 and h5["coords"].dtype == np.float32
        assert h5.attrs["stamp_version"] == "2.5.0" and h5.attrs["tile_size_um"] == 256.0
    table = pd.read_csv(pc.clini_table)
    assert set(table["isMSIH"]) == {"MSIH", "nonMSIH"} and len(table) == 40


@pytest.mark.parametrize("task", ["classification", "regression", "survival"])
def test_baseline_learns_a_mean_shift_on_held_out_patients(
    planted: dict[str, PlantedCohort], task: str, tmp_path: Path
) -> None:
    cohort = _load(planted[task], tmp_path)
    by_id = {p.id: p for p in cohort.patients}  # type: ignore[attr-defined]
    split = make_splits(cohort, 2, 0)[0]
    train = [by_id[i] for i in split["train_patients"]]
    test = [by_id[i] for i in split["test_patients"]]
    model = fit_baseline(train, cohort, 0)
    again = fit_baseline(train, cohort, 0).predict(test, cohort.targets[0])  # type: ignore[attr-defined]
    out = model.predict(test, cohort.targets[0])  # type: ignore[attr-defined]
    key = next(iter(out.values))
    np.testing.assert_array_equal(out.values[key], again.values[key])  # deterministic
    if task == "classification":
        y = np.array([p.target == "nonMSIH" for p in test], dtype=int)  # categories sorted: MSIH, nonMSIH
        assert auroc(y, np.exp(out.values["isMSIH"])) >= 0.8
    elif task == "regression":
        assert pearson_r(np.array([p.target for p in test]), out.values["pred"]) >= 0.5
        assert abs(np.mean(out.values["pred"]) - np.mean([p.target for p in test])) < 10  # table units
    else:
        time, event = np.array([p.target for p in test], dtype=float).T
        assert concordance_index(time, out.values["risk"], event) >= 0.6
        assert model.survival_cut_off is not None


def test_cox_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    time = np.round(rng.exponential(5, 30))  # ties on purpose
    event = (rng.random(30) < 0.7).astype(float)
    beta = rng.normal(size=4) * 0.3
    _, grad = _cox_loss_grad(beta, x, time, event, 0.1)
    eps = 1e-6
    numeric = [
        (
            _cox_loss_grad(beta + eps * e, x, time, event, 0.1)[0]
            - _cox_loss_grad(beta - eps * e, x, time, event, 0.1)[0]
        )
        / (2 * eps)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_crossval_writes_the_baseline_beside_each_fold_and_statistics_report_it(
    planted: dict[str, PlantedCohort], tmp_path: Path
) -> None:
    from stamp.statistics import compute_statistics
    from stamp.statistics.api import check_statistics
    from stamp.statistics.baseline import BASELINE_STATS_NAME

    cohort = _load(planted["classification"], tmp_path)
    paths = run_crossval(cohort, tmp_path / "cv", n_splits=2, advanced=tiny_advanced("abmil", max_epochs=2))
    for path in paths:
        model, base = pd.read_csv(path), pd.read_csv(path.parent / BASELINE_PREDS_NAME)
        assert list(base.columns) == list(model.columns)  # STAMP's patient-preds columns
        assert sorted(base["PATIENT"]) == sorted(model["PATIENT"])
        metrics = fold_metrics(path, cohort)  # type: ignore[arg-type]
        assert {"auroc_isMSIH", "baseline_auroc_isMSIH"} <= set(metrics)

    sec = StatisticsConfig(
        output_dir=tmp_path / "stats", pred_csvs=paths, ground_truth_label="isMSIH", true_class="MSIH"
    )
    result = compute_statistics(sec, n_bootstrap=50)
    assert "mean-pool baseline" in result.summary_markdown and "the model:" in result.summary_markdown
    rows = [r for r in result.rows if r["level"] == "baseline"]
    assert len(rows) == 1 and rows[0]["class"] == "MSIH" and 0 <= rows[0]["roc_auc_score"] <= 1
    aggregate = next(r for r in result.rows if r["level"] == "aggregate" and r["class"] == "MSIH")
    assert set(rows[0]) == set(aggregate)  # one table, same columns
    assert (tmp_path / "stats" / BASELINE_STATS_NAME).is_file()
    assert sum("baseline" in i["label"] for i in result.inputs) == 2
    # a changed baseline file makes the statistics stale (it is one of their inputs)
    assert check_statistics(sec, result.files, n_bootstrap=50).reusable
    first = paths[0].parent / BASELINE_PREDS_NAME
    first.write_text(first.read_text().replace("MSIH,", "MSIH ,", 1))
    assert not check_statistics(sec, result.files, n_bootstrap=50).reusable

    # prediction files without a baseline beside them (e.g. from deploy): STAMP's statistics only
    alone = tmp_path / "alone" / "patient-preds.csv"
    alone.parent.mkdir()
    alone.write_text(paths[1].read_text())
    plain = compute_statistics(
        StatisticsConfig(
            output_dir=tmp_path / "s2", pred_csvs=[alone], ground_truth_label="isMSIH", true_class="MSIH"
        ),
        n_bootstrap=50,
    )
    assert "baseline" not in plain.summary_markdown and all(r["level"] != "baseline" for r in plain.rows)


def test_comparison_says_when_the_model_is_worse_than_the_baseline() -> None:
    good = [{"auroc_x": v, "baseline_auroc_x": b} for v, b in [(0.9, 0.9), (0.92, 0.88), (0.91, 0.93)]]
    lines, warnings = baseline_comparison(good, "vit")
    assert (
        lines == [lines[0]]
        and lines[0].startswith("auroc_x: vit 0.910 [")
        and "mean-pool baseline 0.903" in lines[0]
    )
    assert warnings == []
    bad = [{"auroc_x": v, "baseline_auroc_x": 0.95} for v in (0.7, 0.72, 0.71)]
    assert "worse than the mean-pool baseline" in baseline_comparison(bad, "vit")[1][0]
    mae = [{"mae": v, "baseline_mae": 1.0} for v in (2.0, 2.1, 2.05)]  # lower is better
    assert baseline_comparison(mae, "abmil")[1]


def test_crossval_flow_artifact_shows_the_baseline(
    planted: dict[str, PlantedCohort], tmp_path: Path, prefect_api: str, stamp_log: pytest.LogCaptureFixture
) -> None:
    from stamp_flows.modeling import run_crossval_flow
    from tests.test_modeling_flows import _artifact

    sec = CrossvalConfig(output_dir=tmp_path / "cv", n_splits=2, **planted["classification"].section)
    result = run_crossval_flow(sec, tiny_advanced("abmil", max_epochs=2))
    assert "| auroc_isMSIH |" in result["summary"] and "mean-pool baseline" in result["summary"]
    assert all("baseline_auroc_isMSIH" in row for row in result["folds"])
    artifact = _artifact("crossval-summary")[0]
    assert "mean-pool baseline" in artifact.data
    assert any(
        "vs mean-pool baseline" in r.getMessage() for r in stamp_log.records if r.levelno == logging.INFO
    )
    splits = json.loads((tmp_path / "cv" / "splits.json").read_text())["splits"]
    assert len(splits) == 2
