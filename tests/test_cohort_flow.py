"""``stamp run``: the cohort flow runs the configured stages in order, reports them, stops at a failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stamp.cli import main
from tests.test_report_flows import artifacts, run_stamp, write_fold_preds

pytestmark = pytest.mark.usefixtures("prefect_api")


def _config(tmp_path: Path, csvs: list[Path]) -> Path:
    cfg = tmp_path / "config.yaml"
    stats = {
        "output_dir": str(tmp_path / "stats"),
        "pred_csvs": [str(p) for p in csvs],
        "ground_truth_label": "isMSIH",
        "true_class": "MSIH",
    }
    cfg.write_text(yaml.safe_dump({"statistics": stats}))
    return cfg


def test_run_executes_configured_stages_and_reports_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csvs = write_fold_preds(tmp_path / "cv")
    cfg = _config(tmp_path, csvs)
    assert main(["-c", str(cfg), "run"]) == 0
    printed = capsys.readouterr().out
    assert "| statistics | completed |" in printed
    assert (tmp_path / "stats" / "isMSIH_categorical-stats_aggregated.csv").is_file()
    report = artifacts("cohort-report")[0].data
    assert str(cfg.resolve()) in report and "| statistics | completed |" in report
    from stamp.hashing import file_sha256

    for csv in csvs:  # which prediction files the statistics used, with their digests
        assert f"| `{csv.resolve()}` | `{file_sha256(csv)}` |" in report


def test_run_names_a_stage_without_its_section(tmp_path: Path) -> None:
    cfg = _config(tmp_path, write_fold_preds(tmp_path / "cv", folds=1))
    status, err = run_stamp("-c", str(cfg), "run", "--stages", "preprocess", "statistics")
    assert status == 1 and len(err) == 1
    assert "preprocess (section 'preprocessing')" in err[0]


def test_a_failing_stage_fails_the_run_with_one_line(tmp_path: Path) -> None:
    csvs = write_fold_preds(tmp_path / "cv", folds=1)
    cfg = _config(tmp_path, [*csvs, tmp_path / "missing.csv"])
    status, err = run_stamp("-c", str(cfg), "run")
    assert status == 1 and len(err) == 1
    assert "stage statistics failed" in err[0] and "missing.csv" in err[0]
