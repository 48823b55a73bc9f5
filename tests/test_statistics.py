"""``stamp.statistics``: metrics equal scikit-learn / SciPy / lifelines, CIs, file names, plots, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from PIL import Image
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from stamp.config_models import StatisticsConfig
from stamp.statistics import StatisticsError, StatisticsResult, compute_statistics
from stamp.statistics.bootstrap import bootstrap_class, bootstrap_regression, resample_indices, t_interval
from stamp.statistics.tables import safe_name, sources_for

CLASSES = ["MSIH", "nonMSIH"]


def _read(path: Path, **kw) -> pd.DataFrame:
    """Read a CSV with exact float round trip (pandas' default parser may change the last digit)."""
    return pd.read_csv(path, float_precision="round_trip", **kw)


def _class_table(rng: np.random.Generator, n: int, target: str, classes: list[str], ensemble: bool = False):
    y = rng.integers(0, len(classes), n)
    logits = rng.normal(size=(n, len(classes)))
    logits[np.arange(n), y] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)  # ties, as real CSVs have
    df = pd.DataFrame({"PATIENT": [f"P{i:04d}" for i in range(n)], target: [classes[i] for i in y]})
    df["pred"] = [classes[i] for i in probs.argmax(1)]
    for c, cls in enumerate(classes):
        df[f"{target}_{cls}"] = probs[:, c]
    df["loss"] = -np.log(np.clip(probs[np.arange(n), y], 1e-6, 1))
    if ensemble:
        for cls in classes:
            df[f"std_{target}_{cls}"] = rng.random(n) * 0.1
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def folds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("crossval")
    rng = np.random.default_rng(0)
    return [
        _write(_class_table(rng, 60 + 7 * k, "isMSIH", CLASSES), root / f"split-{k}" / "patient-preds.csv")
        for k in range(5)
    ]


def _cfg(out: Path, csvs: list[Path], **kw) -> StatisticsConfig:
    return StatisticsConfig(output_dir=out, pred_csvs=csvs, **kw)


def _truth(df: pd.DataFrame, target: str, classes: list[str]):
    df = df[df[target].notna()]
    y = df[target].astype(str).to_numpy()
    probs = df[[f"{target}_{c}" for c in classes]].to_numpy(float)
    return y, probs, np.array(classes)[probs.argmax(1)]


@pytest.fixture(scope="module")
def folds_result(
    folds: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, StatisticsResult]:
    out = tmp_path_factory.mktemp("stats-folds")
    return out, compute_statistics(_cfg(out, folds, ground_truth_label="isMSIH", true_class="MSIH"))


def test_fold_metrics_equal_sklearn_and_labels_are_unique(folds, folds_result) -> None:
    out, result = folds_result
    ind = _read(out / "isMSIH_categorical-stats_individual.csv", dtype={"class": str})
    assert list(ind.columns) == [
        "source",
        "class",
        "count",
        "n_patients",
        "roc_auc_score",
        "average_precision_score",
        "f1_score",
        "p_value",
    ]
    msih = ind[ind["class"] == "MSIH"]
    assert list(msih["source"]) == [f"split-{k}/patient-preds" for k in range(5)]  # 5 rows, distinct labels
    for path, (_, row) in zip(folds, msih.iterrows(), strict=True):
        y, probs, pred = _truth(_read(path), "isMSIH", CLASSES)
        pos = y == "MSIH"
        assert row["count"] == pos.sum()
        assert row["roc_auc_score"] == roc_auc_score(pos, probs[:, 0])
        assert row["average_precision_score"] == average_precision_score(pos, probs[:, 0])
        assert row["f1_score"] == f1_score(pos, pred == "MSIH")
        assert row["p_value"] == pytest.approx(
            stats.ttest_ind(probs[pos, 0], probs[~pos, 0]).pvalue, rel=1e-12
        )

    agg = _read(out / "isMSIH_categorical-stats_aggregated.csv").set_index("class")
    aucs = msih["roc_auc_score"].to_numpy()
    lo, hi = stats.t.interval(0.95, len(aucs) - 1, loc=aucs.mean(), scale=stats.sem(aucs))
    assert agg.loc["MSIH", "roc_auc_score_mean"] == pytest.approx(aucs.mean(), rel=1e-12)
    assert agg.loc["MSIH", "roc_auc_score_ci_low"] == pytest.approx(lo, rel=1e-12)
    assert agg.loc["MSIH", "roc_auc_score_ci_high"] == pytest.approx(hi, rel=1e-12)
    assert agg.loc["MSIH", "ci_method"] == "t-interval"
    assert agg.loc["MSIH", "count"] == msih["count"].sum()

    names = sorted(p.name for p in result.files)
    assert len(names) == len(set(names))
    assert {"roc-curve_isMSIH=MSIH.svg", "roc-curve_isMSIH=MSIH.png", "pr-curve_isMSIH=MSIH.png"} <= set(
        names
    )
    assert not (out / "roc-curve_isMSIH=nonMSIH.png").exists()  # true_class given: that class only
    assert all(p.exists() for p in result.files) and set(result.plots) <= set(result.files)
    assert "AUROC" in result.summary_markdown and "t-interval over 5" in result.summary_markdown
    json.dumps(result.rows, allow_nan=False)  # a Prefect table artifact accepts it
    file_rows = [r for r in result.rows if r["level"] == "file" and r["class"] == "MSIH"]
    assert [r["source"] for r in file_rows] == [f"split-{k}/patient-preds" for k in range(5)]


def test_t_interval_matches_scipy() -> None:
    values = [0.71, 0.8, 0.77, 0.69, 0.83]
    mean, lo, hi = t_interval(values)
    ref = stats.t.interval(0.95, df=4, loc=np.mean(values), scale=np.std(values, ddof=1) / np.sqrt(5))
    assert (lo, hi) == pytest.approx(ref, rel=1e-14) and mean == pytest.approx(np.mean(values))
    assert np.isnan(t_interval([0.7])[1])


def test_single_file_bootstrap_ci_seeded(folds: list[Path], tmp_path: Path) -> None:
    a = compute_statistics(_cfg(tmp_path / "a", folds[:1], ground_truth_label="isMSIH"), seed=3)
    b = compute_statistics(_cfg(tmp_path / "b", folds[:1], ground_truth_label="isMSIH"), seed=3)
    c = compute_statistics(_cfg(tmp_path / "c", folds[:1], ground_truth_label="isMSIH"), seed=4)
    ind_a = _read(tmp_path / "a" / "isMSIH_categorical-stats_individual.csv")
    ind_b = _read(tmp_path / "b" / "isMSIH_categorical-stats_individual.csv")
    ind_c = _read(tmp_path / "c" / "isMSIH_categorical-stats_individual.csv")
    pd.testing.assert_frame_equal(ind_a, ind_b)
    assert not ind_a["roc_auc_score_lo"].equals(ind_c["roc_auc_score_lo"])
    for metric in ("roc_auc_score", "average_precision_score", "f1_score"):
        assert (ind_a[f"{metric}_lo"] <= ind_a[metric]).all() and (
            ind_a[metric] <= ind_a[f"{metric}_hi"]
        ).all()
    agg = _read(tmp_path / "a" / "isMSIH_categorical-stats_aggregated.csv")
    assert set(agg["ci_method"]) == {"bootstrap"}
    assert list(agg["roc_auc_score_ci_low"]) == list(ind_a["roc_auc_score_lo"])
    # true_class unset: every class is plotted; the same seed writes the same SVG bytes
    for cls in CLASSES:
        assert (tmp_path / "a" / f"roc-curve_isMSIH={cls}.png").exists()
    svg = "roc-curve_isMSIH=MSIH.svg"
    assert (tmp_path / "a" / svg).read_bytes() == (tmp_path / "b" / svg).read_bytes()
    assert a.rows == b.rows and a.rows != c.rows


def test_vectorised_bootstrap_equals_sklearn_per_draw() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(80) < 0.35
    score = np.round(rng.random(80) * 0.6 + y * 0.3, 1)  # heavy ties
    hit = score > 0.5
    idx = resample_indices(80, 40, seed=1)
    boot = bootstrap_class(y, score, hit, idx)
    valid = [i for i in idx if 0 < y[i].sum() < len(i)]
    assert len(boot.roc_auc_score) == len(valid)
    for k, i in enumerate(valid):
        assert boot.roc_auc_score[k] == pytest.approx(roc_auc_score(y[i], score[i]), abs=1e-12)
        assert boot.average_precision_score[k] == pytest.approx(
            average_precision_score(y[i], score[i]), abs=1e-12
        )
        assert boot.f1_score[k] == pytest.approx(f1_score(y[i], hit[i]), abs=1e-12)
    truth, pred = rng.normal(size=50), rng.normal(size=50)
    idx = resample_indices(50, 10, seed=2)
    reg = bootstrap_regression(truth, pred, idx)
    for k, i in enumerate(idx):
        assert reg["r2_score"][k] == pytest.approx(r2_score(truth[i], pred[i]), abs=1e-12)
        assert reg["pearson_r"][k] == pytest.approx(stats.pearsonr(truth[i], pred[i])[0], abs=1e-12)
        assert reg["rmse"][k] == pytest.approx(np.sqrt(mean_squared_error(truth[i], pred[i])), abs=1e-12)


def test_one_class_draws_are_skipped() -> None:
    y = np.array([True] + [False] * 9)
    boot = bootstrap_class(y, np.linspace(0, 1, 10), y, resample_indices(10, 200, seed=0))
    assert 0 < len(boot.roc_auc_score) < 200  # ~35 % of draws miss the one positive


def test_ensemble_std_columns_are_ignored(tmp_path: Path) -> None:
    df = _class_table(np.random.default_rng(5), 90, "isMSIH", CLASSES, ensemble=True)
    plain = _write(
        df.drop(columns=[c for c in df.columns if c.startswith("std_")]), tmp_path / "plain" / "p.csv"
    )
    ens = _write(df, tmp_path / "ens" / "patient-preds.csv")
    compute_statistics(_cfg(tmp_path / "o1", [ens], ground_truth_label="isMSIH"), n_bootstrap=50)
    compute_statistics(_cfg(tmp_path / "o2", [plain], ground_truth_label="isMSIH"), n_bootstrap=50)
    a = _read(tmp_path / "o1" / "isMSIH_categorical-stats_individual.csv").drop(columns="source")
    b = _read(tmp_path / "o2" / "isMSIH_categorical-stats_individual.csv").drop(columns="source")
    pd.testing.assert_frame_equal(a, b)
    assert list(a["class"]) == CLASSES  # no class named after a std_ column


def test_multitarget_and_slash_in_class_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    sub = _class_table(rng, 120, "subtype", ["A", "B/C", "D"])
    grade = _class_table(rng, 120, "grade", ["low", "high"])
    df = pd.DataFrame({"PATIENT": sub["PATIENT"], "subtype": sub["subtype"], "grade": grade["grade"]})
    df["pred_subtype"], df["pred_grade"] = sub["pred"], grade["pred"]
    for col in sub.columns:
        if col.startswith("subtype_"):
            df[col] = sub[col]
    for col in grade.columns:
        if col.startswith("grade_"):
            df[col] = grade[col]
    df.loc[:9, "grade"] = np.nan  # missing for one target only
    df["loss"] = 0.0
    csv = _write(df, tmp_path / "deploy" / "patient-preds.csv")
    out = tmp_path / "out"
    result = compute_statistics(_cfg(out, [csv], ground_truth_label=["subtype", "grade"]), n_bootstrap=100)
    summary = _read(out / "multitarget_categorical-stats_summary.csv")
    assert list(summary["target"]) == ["subtype"] * 3 + ["grade"] * 2
    assert list(summary["class"]) == ["A", "B/C", "D", "low", "high"]
    ind = _read(out / "grade_categorical-stats_individual.csv").set_index("class")
    y, probs, pred = _truth(df, "grade", ["low", "high"])
    assert ind.loc["high", "roc_auc_score"] == roc_auc_score(y == "high", probs[:, 1])
    assert ind.loc["high", "n_patients"] == 110
    assert (out / "roc-curve_subtype=B_C.png").exists() and (out / "pr-curve_subtype=B_C.svg").exists()
    assert all(p.parent == out for p in result.plots)  # a '/' in a class never makes a folder
    assert (out / "roc-curve_grade=low.png").exists()


def test_inferred_ground_truth_and_stamp_written_file(tmp_path: Path) -> None:
    """A STAMP file (same columns, class labels 0/1, no std_) works without ground_truth_label."""
    df = _class_table(np.random.default_rng(2), 50, "label", ["0", "1"])
    df.loc[:4, "label"] = ["0.0", "1.0", "1.0", "0.0", "1.0"]  # a spreadsheet round trip
    csv = _write(df, tmp_path / "stamp" / "patient-preds.csv")
    compute_statistics(_cfg(tmp_path / "out", [csv], true_class="1"), n_bootstrap=50)
    ind = _read(tmp_path / "out" / "label_categorical-stats_individual.csv", dtype={"class": str})
    assert list(ind["class"]) == ["0", "1"]
    y = df["label"].astype(float).astype(int).astype(str)
    assert ind.loc[1, "roc_auc_score"] == roc_auc_score(y == "1", df["label_1"])
    assert (tmp_path / "out" / "roc-curve_label=1.png").exists()


def _regression_table(rng: np.random.Generator, n: int) -> pd.DataFrame:
    y = rng.normal(50, 10, n)
    pred = 0.7 * y + rng.normal(15, 6, n)
    df = pd.DataFrame(
        {"PATIENT": [f"P{i}" for i in range(n)], "TMB": y, "pred": pred, "loss": np.abs(pred - y)}
    )
    df.loc[0, "TMB"] = np.nan
    return df


def test_regression_metrics_and_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    csvs = [
        _write(_regression_table(rng, 40 + k), tmp_path / f"split-{k}" / "patient-preds.csv")
        for k in range(5)
    ]
    out = tmp_path / "out"
    result = compute_statistics(_cfg(out, csvs, task="regression", ground_truth_label="TMB"))
    ind = _read(out / "TMB_regression-stats_individual.csv")
    for csv, (_, row) in zip(csvs, ind.iterrows(), strict=True):
        df = _read(csv).dropna(subset=["TMB"])
        y, p = df["TMB"].to_numpy(), df["pred"].to_numpy()
        assert row["count"] == len(y)
        assert row["r2_score"] == r2_score(y, p)
        assert row["mae"] == mean_absolute_error(y, p)
        assert row["rmse"] == np.sqrt(mean_squared_error(y, p))
        r, pv = stats.pearsonr(y, p)
        assert row["pearson_r"] == r and row["pearson_p"] == pv
    agg = _read(out / "TMB_regression-stats_aggregated.csv")
    mean, lo, hi = t_interval(ind["r2_score"])
    assert agg.loc[0, "r2_score_mean"] == mean and agg.loc[0, "r2_score_ci_low"] == pytest.approx(lo)
    scatters = sorted(p.name for p in result.plots)
    assert scatters == [f"split-{k}_patient-preds_scatter.png" for k in range(5)]
    assert all((out / "plots" / f"split-{k}_patient-preds_scatter.svg").exists() for k in range(5))
    assert "R²" in result.summary_markdown

    single = compute_statistics(_cfg(tmp_path / "one", csvs[:1], task="regression"), n_bootstrap=200)
    one = _read(tmp_path / "one" / "TMB_regression-stats_individual.csv")
    assert one.loc[0, "r2_score_lo"] <= one.loc[0, "r2_score"] <= one.loc[0, "r2_score_hi"]
    assert single.plots[0].name == "patient-preds_scatter.png"


def _survival_table(rng: np.random.Generator, n: int, cut_off: float | None) -> pd.DataFrame:
    risk = rng.normal(size=n)
    time = rng.exponential(np.exp(-risk) * 20)
    event = (rng.random(n) < 0.7).astype(int)
    df = pd.DataFrame(
        {"PATIENT": [f"P{i}" for i in range(n)], "pred_score": risk, "OS_time": time, "OS_event": event}
    )
    df["std_pred_score"] = 0.1
    if cut_off is not None:
        df[f"cut_off={cut_off}"] = ""
    return df


def test_survival_metrics_and_km_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    csvs = [
        _write(_survival_table(rng, 60, 0.25), tmp_path / "fold-a" / "patient-preds.csv"),
        _write(_survival_table(rng, 50, None), tmp_path / "fold-b" / "patient-preds.csv"),
    ]
    out = tmp_path / "out"
    cfg = _cfg(out, csvs, task="survival", time_label="OS_time", status_label="OS_event")
    result = compute_statistics(cfg)
    ind = _read(out / "survival-stats_individual.csv")
    for csv, (_, row), expected_cut in zip(csvs, ind.iterrows(), [0.25, None], strict=True):
        df = _read(csv)
        t, e, risk = df["OS_time"].to_numpy(), df["OS_event"].to_numpy(), df["pred_score"].to_numpy()
        assert row["c_index"] == concordance_index(t, -risk, e)
        cut = expected_cut if expected_cut is not None else np.median(risk)
        hi = risk > cut
        assert row["threshold"] == cut
        assert row["logrank_p"] == logrank_test(t[~hi], t[hi], e[~hi], e[hi]).p_value
        assert row["events"] == e.sum() and row["count"] == len(df)
    assert list(ind["threshold_from"]) == ["cut_off column", "median"]
    assert sorted(p.name for p in result.plots) == [
        "fold-a_patient-preds_km_curve.png",
        "fold-b_patient-preds_km_curve.png",
    ]
    json.dumps(result.rows, allow_nan=False)
    # columns inferred (after pred_score, std_ skipped) when time/status labels are not configured
    compute_statistics(_cfg(tmp_path / "inferred", csvs[:1], task="survival"))
    again = _read(tmp_path / "inferred" / "survival-stats_individual.csv")
    assert again.loc[0, "c_index"] == ind.loc[0, "c_index"]


def test_pngs_are_real_images(folds_result, tmp_path: Path) -> None:
    _, result = folds_result
    rng = np.random.default_rng(9)
    surv = compute_statistics(
        _cfg(
            tmp_path,
            [_write(_survival_table(rng, 40, 0.0), tmp_path / "s.csv")],
            task="survival",
            time_label="OS_time",
            status_label="OS_event",
        )
    )
    for png in [*result.plots, *surv.plots]:
        with Image.open(png) as im:
            assert im.width > 100 and im.height > 100
            assert 3.5 < im.width / 200 < 4.0 and 4.0 < im.height / 200 < 4.2  # ~3.8 × 4.1 in at 200 dpi
            assert np.asarray(im.convert("L"), dtype=float).std() > 10  # not blank


def test_written_by_our_predictions_module(tmp_path: Path) -> None:
    from stamp.modeling.predictions import Outputs, patient_preds_table, write_csv

    rng = np.random.default_rng(6)
    ids = [f"P{i}" for i in range(40)]
    truths = ["pos" if i % 3 == 0 else "neg" for i in range(40)]
    logp = np.log(rng.dirichlet([1, 1], size=40))
    spread = {"isX": rng.random((40, 2)) * 0.1}
    table = patient_preds_table(
        Outputs(ids, {"isX": logp}, spread),
        truths,
        task="classification",
        targets=["isX"],
        categories={"isX": ["neg", "pos"]},
    )
    csv = write_csv(table, tmp_path / "ens" / "patient-preds.csv")
    compute_statistics(
        _cfg(tmp_path / "o", [csv], ground_truth_label="isX", true_class="pos"), n_bootstrap=50
    )
    ind = _read(tmp_path / "o" / "isX_categorical-stats_individual.csv").set_index("class")
    assert ind.loc["pos", "roc_auc_score"] == roc_auc_score(np.array(truths) == "pos", np.exp(logp[:, 1]))

    risk = rng.normal(size=40)
    surv = patient_preds_table(
        Outputs(ids, {"risk": risk}),
        [(float(t), float(e)) for t, e in zip(rng.exponential(10, 40), rng.random(40) < 0.6, strict=True)],
        task="survival",
        targets=["days", "dead"],
        cut_off=0.1,
    )
    csv = write_csv(surv, tmp_path / "surv" / "patient-preds.csv")
    compute_statistics(_cfg(tmp_path / "so", [csv], task="survival", time_label="days", status_label="dead"))
    assert _read(tmp_path / "so" / "survival-stats_individual.csv").loc[0, "threshold"] == 0.1


def test_safe_names_and_labels(tmp_path: Path) -> None:
    assert safe_name("a/b c:d") == "a_b_c_d" and safe_name("isMSIH=MSI-H") == "isMSIH=MSI-H"
    assert safe_name("..") == "_.."
    for rel in ("x/a_b/p.csv", "x/a/b_p.csv", "y/p.csv"):
        _write(pd.DataFrame({"a": [1]}), tmp_path / rel)
    srcs = sources_for([tmp_path / "x/a_b/p.csv", tmp_path / "x/a/b_p.csv", tmp_path / "y/p.csv"])
    assert [s.label for s in srcs] == ["x/a_b/p", "x/a/b_p", "y/p"]
    assert len({s.slug for s in srcs}) == 3 and all("/" not in s.slug for s in srcs)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing_gt_column", "no column 'isMSIH'"),
        ("no_ground_truth", "no ground truth in column 'isMSIH'"),
        ("one_class", "one class only"),
        ("unknown_class", "'MSS'"),
        ("missing_file", "does not exist"),
        ("bad_true_class", "true_class 'MSS'"),
        ("survival_labels", "no column 'OS'"),
        ("regression_text", "non-number"),
    ],
)
def test_bad_input_is_one_line_error_naming_csv(tmp_path: Path, case: str, needle: str) -> None:
    df = _class_table(np.random.default_rng(1), 30, "isMSIH", CLASSES)
    csv = tmp_path / "preds" / "patient-preds.csv"
    kw: dict = {"ground_truth_label": "isMSIH"}
    if case == "missing_gt_column":
        df = df.rename(columns={"isMSIH": "label"})
    elif case == "no_ground_truth":
        df["isMSIH"] = np.nan
    elif case == "one_class":
        df["isMSIH"] = "MSIH"
    elif case == "unknown_class":
        df.loc[3, "isMSIH"] = "MSS"
    elif case == "bad_true_class":
        kw["true_class"] = "MSS"
    elif case == "survival_labels":
        df = _survival_table(np.random.default_rng(1), 20, None)
        kw = {"task": "survival", "time_label": "OS", "status_label": "OS_event"}
    elif case == "regression_text":
        df = _regression_table(np.random.default_rng(1), 20)
        df["TMB"] = df["TMB"].astype(object)
        df.loc[2, "TMB"] = "high"
        kw = {"task": "regression", "ground_truth_label": "TMB"}
    if case != "missing_file":
        _write(df, csv)
    with pytest.raises(StatisticsError) as err:
        compute_statistics(_cfg(tmp_path / "out", [csv], **kw), n_bootstrap=20)
    message = str(err.value)
    assert needle in message and "\n" not in message
    if case != "bad_true_class":
        assert str(csv) in message
    assert isinstance(err.value, ValueError)


def test_t_interval_is_clipped_to_the_metric_range() -> None:
    mean, lo, hi = t_interval([0.55, 0.99, 1.0, 0.6, 1.0], bounds=(0.0, 1.0))
    _, raw_lo, raw_hi = t_interval([0.55, 0.99, 1.0, 0.6, 1.0])
    assert raw_hi > 1.0 and hi == 1.0 and lo == raw_lo and mean == pytest.approx(0.828)


def test_formula_like_names_are_guarded_in_csvs_and_round_trip(tmp_path) -> None:
    """Patient ids / class names starting ``=`` are written with a ``'`` guard, read back as they were."""
    from stamp.modeling.predictions import write_csv

    classes = ["=MSI*H", "nonMSIH"]
    df = _class_table(np.random.default_rng(7), 50, "isMSIH", classes)
    df["PATIENT"] = [f"=1+{p}" for p in df["PATIENT"]]
    csv = tmp_path / "preds" / "patient-preds.csv"
    csv.parent.mkdir()
    write_csv(df, csv)
    text = csv.read_text()
    assert "\n'=1+P0000," in text and ",'=MSI*H," in text and "isMSIH_=MSI*H" in text  # headers as configured
    assert list(pd.read_csv(csv, dtype=str)["isMSIH"].str.lstrip("'")) == list(df["isMSIH"])

    out = tmp_path / "out"
    result = compute_statistics(_cfg(out, [csv], ground_truth_label="isMSIH", true_class="=MSI*H"))
    ind = pd.read_csv(out / "isMSIH_categorical-stats_individual.csv", dtype=str)
    assert set(ind["class"]) == {"'=MSI*H", "nonMSIH"}
    y, probs, _ = _truth(df, "isMSIH", classes)
    row = ind[ind["class"] == "'=MSI*H"].iloc[0]
    assert float(row["roc_auc_score"]) == pytest.approx(roc_auc_score(y == "=MSI*H", probs[:, 0]), rel=1e-12)
    assert "**isMSIH = =MSI\\*H**" in result.summary_markdown
