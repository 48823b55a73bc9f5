"""Markdown and CSV escaping of names from users (stamp.escaping)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stamp.escaping import (
    csv_safe,
    csv_safe_frame,
    csv_unguard,
    csv_unguard_frame,
    markdown_cell,
    markdown_code,
)


@pytest.mark.parametrize(
    "raw,cell",
    [
        ("a|b", r"a\|b"),
        ("x\n| fake | row |", r"x \| fake \| row \|"),
        ("[click](http://evil)", r"\[click\](http://evil)"),
        ("![img](x)", r"!\[img\](x)"),
        ("<img src=x>", r"\<img src=x\>"),
        ("`code`", r"\`code\`"),
        ("**bold**", r"\*\*bold\*\*"),
        ("_it_", r"\_it\_"),
        ("a\\|b", r"a\\\|b"),
    ],
)
def test_markdown_cell_is_one_literal_line(raw, cell):
    assert markdown_cell(raw) == cell


def test_markdown_cell_keeps_ordinary_names():
    assert markdown_cell("slide_01.svs") == "slide_01.svs"
    assert markdown_cell("TCGA-AA-3543 (A)") == "TCGA-AA-3543 (A)"
    assert markdown_cell(None) == ""


def test_markdown_code_cannot_be_closed_early():
    assert markdown_code("/data/a.csv") == "`/data/a.csv`"
    code = markdown_code("a`b``c|d\ne")
    assert code.startswith("```") and code.endswith("```") and "\\|" in code and "\n" not in code


@pytest.mark.parametrize(
    "raw", ["=1+1", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tx", "\rx", "'=1+1", "''@x"]
)
def test_formula_cells_are_guarded_and_round_trip(raw):
    safe = csv_safe(raw)
    assert safe.startswith("'") and csv_unguard(safe) == raw


@pytest.mark.parametrize(
    "value", ["-0.5", "+3", "-1", "1e-3", "-", "+", "A", "'quoted", "B/C", -0.5, 3, None]
)
def test_numbers_and_plain_text_are_unchanged(value):
    assert csv_safe(value) == value or (value != value)
    assert csv_unguard(value) == value or (value != value)


def test_frames_guard_text_columns_only():
    df = pd.DataFrame(
        {"PATIENT": ["=1+1", "P2"], "isMSIH": ["-1", "@x"], "isMSIH_-1": [-0.5, 0.25], "n": [1, 2]}
    )
    safe = csv_safe_frame(df)
    assert list(safe["PATIENT"]) == ["'=1+1", "P2"] and list(safe["isMSIH"]) == ["-1", "'@x"]
    assert list(safe.columns) == list(df.columns) and safe["isMSIH_-1"].dtype == np.float64
    pd.testing.assert_frame_equal(csv_unguard_frame(safe), df)
    assert list(df["PATIENT"]) == ["=1+1", "P2"]  # the input is not modified


def test_preprocess_summary_keeps_one_row_per_slide(tmp_path):
    from stamp_flows.preprocess import TABLE_COLUMNS, _summary_md

    row = dict.fromkeys(TABLE_COLUMNS, "")
    row.update(slide="evil|x\n| forged | done |", status="failed", reason="see [here](http://x) `code`")
    md = _summary_md([row], {"failed": 1}, tmp_path / "fe`ats")
    lines = md.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 3  # header, separator, one slide
    assert r"evil\|x \| forged \| done \|" in table[2] and r"\[here\](http://x) \`code\`" in table[2]
    assert f"features: ``{tmp_path / 'fe`ats'}``" in lines


def test_report_image_alt_text_and_slide_names_are_literal(tmp_path):
    from PIL import Image

    from stamp_flows.images import inline_png

    png = tmp_path / "a](http:evil).png"
    Image.new("RGB", (4, 4)).save(png)
    assert inline_png(png).startswith(r"![a\](http:evil).png](data:image/png;base64,")
