"""Clinical + slide tables → patients: grouping, file names, NA tokens, drop reasons, targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from stamp.cohort import (
    NA_TOKENS,
    detect_feature_type,
    load_cohort,
    parse_status,
    safe_name,
)
from stamp.features import write_embedding, write_tile_features


def _tiles(path: Path, n: int = 4, d: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) * 256.0, np.zeros(n)], axis=1)
    return write_tile_features(
        path,
        rng.normal(size=(n, d)),
        coords,
        extractor="demo",
        tile_size_um=256.0,
        tile_size_px=224,
        code_hash="abcd1234",
    )


def _table(path: Path, rows: Sequence[Sequence[object]], columns: Sequence[str]) -> Path:
    df = pd.DataFrame([list(r) for r in rows], columns=list(columns))
    if path.suffix == ".xlsx":
        df.to_excel(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _classification_cohort(tmp_path: Path, n: int = 4) -> tuple[Path, Path, Path]:
    feats = tmp_path / "feats"
    clini_rows, slide_rows = [], []
    for i in range(n):
        pid = f"P{i}"
        clini_rows.append([pid, "MSIH" if i % 2 else "nonMSIH"])
        slide_rows.append([pid, f"{pid}_s0.h5"])
        _tiles(feats / f"{pid}_s0.h5", seed=i)
    clini = _table(tmp_path / "clini.csv", clini_rows, ["PATIENT", "isMSIH"])
    slide = _table(tmp_path / "slide.csv", slide_rows, ["PATIENT", "FILENAME"])
    return clini, slide, feats


def test_slides_grouped_whatever_the_row_order(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    for name in ("a1", "b1", "a2", "a3", "b2"):
        _tiles(feats / f"{name}.h5")
    slide = _table(
        tmp_path / "slide.csv",
        [["A", "a1.h5"], ["B", "b1.h5"], ["A", "a2.h5"], ["B", "b2.h5"], ["A", "a3.h5"]],
        ["PATIENT", "FILENAME"],
    )
    clini = _table(tmp_path / "clini.csv", [["A", "x"], ["B", "y"]], ["PATIENT", "label"])
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label="label",
    )
    by_id = {p.id: p for p in cohort.patients}
    assert [f.name for f in by_id["A"].feature_files] == ["a1.h5", "a2.h5", "a3.h5"]
    assert [f.name for f in by_id["B"].feature_files] == ["b1.h5", "b2.h5"]
    assert all(f.is_absolute() for p in cohort.patients for f in p.feature_files)
    assert cohort.feature_info["n_tiles"] == 5 * 4 and cohort.feature_info["dim"] == 8


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_filename_with_or_without_h5_and_table_formats(tmp_path: Path, suffix: str) -> None:
    feats = tmp_path / "feats"
    for name in ("s1", "s2", "sub/s3", "s4"):
        _tiles(feats / f"{name}.h5")
    slide = _table(
        tmp_path / f"slide{suffix}",
        [["P1", "s1.h5"], ["P1", "s2"], ["P2", "sub/s3"], ["P3", "s4.svs"]],
        ["PATIENT", "FILENAME"],
    )
    clini = _table(
        tmp_path / f"clini{suffix}",
        [["P1", "a", 1], ["P2", "b", 2], ["P3", "a", 3]],
        ["PATIENT", "label", "x"],
    )
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label="label",
    )
    files = {
        p.id: [f.relative_to(feats.resolve()).as_posix() for f in p.feature_files] for p in cohort.patients
    }
    assert files == {"P1": ["s1.h5", "s2.h5"], "P2": ["sub/s3.h5"], "P3": ["s4.h5"]}
    assert [p.target for p in cohort.patients] == ["a", "b", "a"]
    assert cohort.categories == {"label": ["a", "b"]} and cohort.dropped == {}


def test_duplicate_filename_is_an_error(tmp_path: Path) -> None:
    clini, _, feats = _classification_cohort(tmp_path)
    slide = _table(tmp_path / "dup.csv", [["P0", "P0_s0.h5"], ["P1", "P0_s0"]], ["PATIENT", "FILENAME"])
    with pytest.raises(
        ValueError, match=r"dup\.csv: FILENAME 'P0_s0' \(patient P1\) is the same feature file"
    ):
        load_cohort(
            task="classification",
            clini_table=clini,
            slide_table=slide,
            feature_dir=feats,
            ground_truth_label="isMSIH",
        )


def test_duplicate_patient_error_names_it(tmp_path: Path) -> None:
    _, slide, feats = _classification_cohort(tmp_path)
    clini = _table(tmp_path / "c.csv", [["P0", "a"], ["P1", "b"], ["P0", "b"]], ["PATIENT", "isMSIH"])
    with pytest.raises(ValueError, match=r"c\.csv: duplicate patient 'P0' \(2 rows\) in column 'PATIENT'"):
        load_cohort(
            task="classification",
            clini_table=clini,
            slide_table=slide,
            feature_dir=feats,
            ground_truth_label="isMSIH",
        )


def test_missing_column_error_names_file_and_columns(tmp_path: Path) -> None:
    clini, slide, feats = _classification_cohort(tmp_path)
    with pytest.raises(
        ValueError, match=r"clini\.csv: clinical table has no column 'nope'; columns are 'PATIENT'"
    ):
        load_cohort(
            task="classification",
            clini_table=clini,
            slide_table=slide,
            feature_dir=feats,
            ground_truth_label="nope",
        )


@pytest.mark.parametrize("token", ["", "NA", "nan", "N/A", "#N/A", "-", "?", "NaN", "None", "null", " na "])
def test_na_tokens_are_missing(tmp_path: Path, token: str) -> None:
    assert token.strip() in NA_TOKENS or token.strip().upper() in NA_TOKENS
    clini, slide, feats = _classification_cohort(tmp_path, n=5)
    df = pd.read_csv(clini, dtype=str)
    df.loc[4, "isMSIH"] = token
    df.to_csv(clini, index=False)
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label="isMSIH",
    )
    assert cohort.dropped == {"missing ground truth": ["P4"]}
    assert [p.id for p in cohort.patients] == ["P0", "P1", "P2", "P3"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("event", 1.0), ("Dead", 1.0), ("deceased", 1.0), ("YES", 1.0), ("y", 1.0), ("true", 1.0),
     ("2", 1.0), (1, 1.0), (True, 1.0), ("0", 0.0), ("alive", 0.0), ("Censored", 0.0), ("no", 0.0),
     ("false", 0.0), (0.0, 0.0), ("0.0", 0.0), ("NA", math.nan), ("", math.nan), ("?", math.nan),
     (None, math.nan), (float("nan"), math.nan), ("maybe", math.nan), ("-1", math.nan)],
)  # fmt: skip
def test_parse_status_vocabulary(value: object, expected: float) -> None:
    got = parse_status(value)  # type: ignore[arg-type]
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_every_drop_reason_counted_and_logged(tmp_path: Path, stamp_log: pytest.LogCaptureFixture) -> None:
    feats = tmp_path / "feats"
    for pid in ("OK1", "OK2", "NOCLINI", "NOGT", "WRONG"):
        _tiles(feats / f"{pid}.h5")
    (feats / "BROKEN.h5").write_bytes(b"not an h5 file")
    with h5py.File(feats / "EMPTY.h5", "w") as h5:
        h5["feats"] = np.zeros((0, 8), np.float16)
        h5["coords"] = np.zeros((0, 2), np.float32)
        h5.attrs.update({"feat_type": "tile", "unit": "um", "tile_size_um": 256.0})
    slide_rows = [[p, f"{p}.h5"] for p in ("OK1", "OK2", "NOCLINI", "NOGT", "WRONG", "BROKEN", "EMPTY")]
    slide = _table(tmp_path / "slide.csv", [*slide_rows, ["NOFILE", "missing.h5"]], ["PATIENT", "FILENAME"])
    clini_rows = [["OK1", "a"], ["OK2", "b"], ["NOGT", "NA"], ["WRONG", "c"], ["BROKEN", "a"], ["EMPTY", "a"]]
    clini = _table(tmp_path / "clini.csv", [*clini_rows, ["NOFILE", "a"], ["NOSLIDE", "b"]], ["PATIENT", "y"])
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label="y",
        categories=["a", "b"],
    )
    assert [p.id for p in cohort.patients] == ["OK1", "OK2"]
    assert cohort.dropped == {
        "not in clinical table": ["NOCLINI"],
        "no slides in slide table": ["NOSLIDE"],
        "no feature files": ["NOFILE"],
        "unreadable feature files": ["BROKEN"],
        "feature files without tiles": ["EMPTY"],
        "missing ground truth": ["NOGT"],
        "label not in categories": ["WRONG"],
    }
    messages = [r.getMessage() for r in stamp_log.records]
    for reason in cohort.dropped:
        assert f"1 patient(s) dropped: {reason} (" in "\n".join(messages)
    assert "1 slide(s) of the slide table have no feature file" in "\n".join(messages)
    assert messages[-1].startswith(
        "Total patients: 9 (clinical table: 8, with features/slides: 8) / usable: 2 (dropped: 7)"
    )


def test_survival_and_regression_drop_reasons(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    ids = ["OK", "OK2", "NOTIME", "BADTIME", "NEGTIME", "NOSTATUS", "BADSTATUS"]
    for pid in ids:
        _tiles(feats / f"{pid}.h5")
    slide = _table(tmp_path / "slide.csv", [[p, p] for p in ids], ["PATIENT", "FILENAME"])
    rows = [["OK", "12.5", "dead", "1.5"], ["OK2", "3", "alive", "x"], ["NOTIME", "NA", "1", "2"],
            ["BADTIME", "soon", "1", ""], ["NEGTIME", "-3", "1", "2"], ["NOSTATUS", "5", "", "2"],
            ["BADSTATUS", "5", "maybe", "2"]]  # fmt: skip
    clini = _table(tmp_path / "clini.csv", rows, ["PATIENT", "OS_time", "OS_event", "TMB"])
    surv = load_cohort(
        task="survival",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label=None,
        time_label="OS_time",
        status_label="OS_event",
    )
    assert {p.id: p.target for p in surv.patients} == {"OK": (12.5, 1.0), "OK2": (3.0, 0.0)}
    assert surv.targets == ["OS_time", "OS_event"] and surv.categories == {}
    assert surv.dropped == {
        "missing survival time": ["NOTIME"],
        "invalid survival time": ["BADTIME", "NEGTIME"],
        "missing survival status": ["NOSTATUS"],
        "unrecognised survival status": ["BADSTATUS"],
    }
    reg = load_cohort(
        task="regression", clini_table=clini, slide_table=slide, feature_dir=feats, ground_truth_label="TMB"
    )
    assert {p.id: p.target for p in reg.patients} == {"OK": 1.5, "NOTIME": 2.0, "NEGTIME": 2.0, "NOSTATUS": 2.0,
                                                     "BADSTATUS": 2.0}  # fmt: skip
    assert reg.dropped == {"non-numeric ground truth": ["OK2"], "missing ground truth": ["BADTIME"]}


def test_keep_missing_ground_truth_and_deploy_without_labels(tmp_path: Path) -> None:
    clini, slide, feats = _classification_cohort(tmp_path, n=4)
    _table(clini, [["P0", "MSIH"], ["P1", "NA"], ["P2", "nonMSIH"], ["P3", "odd"]], ["PATIENT", "isMSIH"])
    kwargs = dict(task="classification", slide_table=slide, feature_dir=feats, ground_truth_label="isMSIH")
    kept = load_cohort(clini_table=clini, drop_patients_with_missing_ground_truth=False, **kwargs)  # type: ignore[arg-type]
    assert {p.id: p.target for p in kept.patients} == {"P0": "MSIH", "P1": None, "P2": "nonMSIH", "P3": "odd"}
    assert [p.id for p in kept.with_targets()] == ["P0", "P2", "P3"]
    deploy = load_cohort(
        clini_table=clini,
        categories=["MSIH", "nonMSIH"],
        require_targets=False,
        **kwargs,  # type: ignore[arg-type]
    )
    assert {p.id: p.target for p in deploy.patients} == {"P0": "MSIH", "P2": "nonMSIH", "P3": None}
    assert deploy.dropped == {"missing ground truth": ["P1"]}
    bare = load_cohort(clini_table=None, require_targets=False, **kwargs)  # type: ignore[arg-type]
    assert [(p.id, p.target) for p in bare.patients] == [(f"P{i}", None) for i in range(4)]
    with pytest.raises(ValueError, match="needs clini_table"):
        load_cohort(clini_table=None, **kwargs)  # type: ignore[arg-type]


def test_categories_given_sorted_unique_and_class_checks(
    tmp_path: Path, stamp_log: pytest.LogCaptureFixture
) -> None:
    clini, slide, feats = _classification_cohort(tmp_path, n=4)
    _table(clini, [["P0", "b"], ["P1", "a"], ["P2", "c"], ["P3", "a"]], ["PATIENT", "y"])
    kwargs = dict(
        task="classification", clini_table=clini, slide_table=slide, feature_dir=feats, ground_truth_label="y"
    )
    auto = load_cohort(**kwargs)  # type: ignore[arg-type]
    assert auto.categories == {"y": ["a", "b", "c"]} and auto.dropped == {}
    assert "class(es) with fewer than 16 patients: a (2), b (1), c (1)" in stamp_log.text
    given = load_cohort(categories=["c", "a"], **kwargs)  # type: ignore[arg-type]
    assert given.categories == {"y": ["c", "a"]}
    assert [p.id for p in given.patients] == ["P1", "P2", "P3"]
    assert given.dropped == {"label not in categories": ["P0"]}
    with pytest.raises(ValueError, match=r"y: classification needs at least 2 classes, found 1 \('a'\)"):
        load_cohort(categories=["a"], **kwargs)  # type: ignore[arg-type]


def test_multi_target(tmp_path: Path) -> None:
    clini, slide, feats = _classification_cohort(tmp_path, n=5)
    rows = [["P0", "x", "1"], ["P1", "y", ""], ["P2", "NA", "2"], ["P3", "NA", "NA"], ["P4", "z", "1"]]
    _table(clini, rows, ["PATIENT", "t1", "t2"])
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label=["t1", "t2"],
        categories={"t1": ["x", "y"]},
    )
    assert cohort.multi_target and cohort.targets == ["t1", "t2"]
    assert cohort.categories == {"t1": ["x", "y"], "t2": ["1", "2"]}
    assert {p.id: p.target for p in cohort.patients} == {
        "P0": {"t1": "x", "t2": "1"},
        "P1": {"t1": "y", "t2": None},
        "P2": {"t1": None, "t2": "2"},
        "P4": {"t1": None, "t2": "1"},  # 'z' is outside t1's categories
    }
    assert cohort.dropped == {"all targets missing": ["P3"]}
    with pytest.raises(ValueError, match="multi-target"):
        load_cohort(
            task="regression",
            clini_table=clini,
            slide_table=slide,
            feature_dir=feats,
            ground_truth_label=["t1", "t2"],
        )


def test_patient_level_features_found_by_name(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    for i, pid in enumerate(("P1", "P2", "P3")):
        write_embedding(
            feats / f"{pid}.h5",
            np.full(6, i, np.float32),
            feat_type="patient",
            encoder="titan",
            code_hash="x",
        )
    clini = _table(tmp_path / "c.csv", [["P1", "a"], ["P2", "b"], ["P4", "a"]], ["PATIENT", "y"])
    cohort = load_cohort(
        task="classification", clini_table=clini, slide_table=None, feature_dir=feats, ground_truth_label="y"
    )
    assert cohort.feature_type == "patient"
    assert [(p.id, p.feature_files) for p in cohort.patients] == [
        ("P1", (feats.resolve() / "P1.h5",)),
        ("P2", (feats.resolve() / "P2.h5",)),
    ]
    assert cohort.dropped == {"no <PATIENT>.h5 in feature_dir": ["P4"], "not in clinical table": ["P3"]}
    assert cohort.feature_info["dim"] == 6 and cohort.feature_info["extractor"] == "titan"


def test_detect_feature_type(tmp_path: Path) -> None:
    _tiles(tmp_path / "tiles" / "a" / "s.h5")
    assert detect_feature_type(tmp_path / "tiles") == "tile"
    write_embedding(
        tmp_path / "slides" / "s.h5", np.ones(4), feat_type="slide", encoder="cobra", code_hash="x"
    )
    assert detect_feature_type(tmp_path / "slides") == "slide"
    (tmp_path / "legacy").mkdir()
    with h5py.File(tmp_path / "legacy" / "s.h5", "w") as h5:
        h5["feats"] = np.ones((1, 4))
        h5.attrs["encoder"] = "madeleine"  # old slide embeddings: an encoder attr but no feat_type
    assert detect_feature_type(tmp_path / "legacy") == "slide"
    _tiles(tmp_path / "slides" / "t.h5")
    with pytest.raises(
        ValueError, match=r"slides: mixed feature types: 1 slide \(e\.g\. s\.h5\), 1 tile \(e\.g\. t\.h5\)"
    ):
        detect_feature_type(tmp_path / "slides")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no readable .h5 feature files"):
        detect_feature_type(tmp_path / "none")


def test_safe_name() -> None:
    assert safe_name("isMSIH") == "isMSIH" and safe_name("OS_time-1.5") == "OS_time-1.5"
    unsafe = safe_name("a/b c")
    assert "/" not in unsafe and " " not in unsafe and unsafe.startswith("a_b_c-")
    labels = ["a/b c", "a b/c", "a_b_c", "a b c", "..", "", "x" * 300, "ü/ß"]
    names = [safe_name(label) for label in labels]
    assert len(set(names)) == len(labels)
    assert all(n and "/" not in n and not n.startswith(".") and len(n) <= 100 for n in names)
    assert safe_name("a/b c") == unsafe  # stable


def test_latin1_csv_and_unsupported_table(tmp_path: Path, stamp_log: pytest.LogCaptureFixture) -> None:
    clini, slide, feats = _classification_cohort(tmp_path, n=2)
    clini.write_bytes("PATIENT,isMSIH\nP0,positiv\xfc\nP1,negativ\n".encode("latin-1"))
    cohort = load_cohort(
        task="classification",
        clini_table=clini,
        slide_table=slide,
        feature_dir=feats,
        ground_truth_label="isMSIH",
    )
    assert [p.target for p in cohort.patients] == ["positivü", "negativ"]
    assert "not UTF-8, read as Latin-1" in stamp_log.text
    clini.with_suffix(".json").write_text("{}")
    with pytest.raises(ValueError, match=r"clini\.json: clinical table must be \.csv or \.xlsx"):
        load_cohort(
            task="classification",
            clini_table=clini.with_suffix(".json"),
            slide_table=slide,
            feature_dir=feats,
            ground_truth_label="isMSIH",
        )
