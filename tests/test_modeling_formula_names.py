"""L7 round trip: class names a spreadsheet would read as formulas keep their metrics in the crossval summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stamp.cohort import CohortData
from stamp.modeling.predictions import write_csv
from stamp.modeling.stage import preds_metrics


def test_formula_like_class_names_score_like_plain_ones(tmp_path: Path) -> None:
    def auroc_with(neg: str, pos: str) -> float:
        truth = [neg, pos, neg, pos]
        df = pd.DataFrame(
            {
                "PATIENT": ["=1+1", "p2", "@p3", "p4"],
                "grade": truth,
                f"grade_{neg}": [0.9, 0.4, 0.6, 0.2],
                f"grade_{pos}": [0.1, 0.6, 0.4, 0.8],
            }
        )
        csv = write_csv(df, tmp_path / f"{neg}-patient-preds.csv")
        cohort = CohortData("classification", "tile", [], ["grade"], {"grade": [neg, pos]}, {})
        return preds_metrics(csv, cohort)["auroc_grade"]

    assert auroc_with("=low", "=high") == auroc_with("low", "high") == 1.0
    written = (tmp_path / "=low-patient-preds.csv").read_text()
    assert "'=high" in written and "'=1+1" in written  # what a spreadsheet opens is text, not a formula
