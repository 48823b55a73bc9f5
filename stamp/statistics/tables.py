"""Reading and validating ``patient-preds*.csv`` files, source labels, safe file names, CSV output.

Every CSV gets a label unique within one run: its path relative to the common parent folder of
all CSVs, without the suffix (``split-0/patient-preds``), and a file-name-safe slug of it
(``split-0_patient-preds``). STAMP keyed files by parent folder or by stem only, so crossval
files (all named ``patient-preds.csv``) or two files in one folder overwrote each other.

Columns named ``std_…`` (ensemble spread, ours) are ignored everywhere.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stamp.escaping import csv_safe_frame, csv_unguard_frame
from stamp.fileio import atomic_path

__all__ = [
    "StatisticsError",
    "Source",
    "ClassData",
    "classification_data",
    "classification_targets",
    "numeric_column",
    "read_preds",
    "require_columns",
    "safe_name",
    "sources_for",
    "write_table",
]


class StatisticsError(ValueError):
    """Bad statistics input (missing file or column, no ground truth, one class only): one line."""


@dataclass(frozen=True)
class Source:
    """One prediction CSV: its path, a human label unique in this run and a file-name slug of it."""

    path: Path
    label: str
    slug: str


_UNSAFE = re.compile(r"[^\w.=+-]+")


def safe_name(text: str) -> str:
    """``text`` usable as (part of) a file name: runs of other characters than word chars, ``.=+-``
    (``/``, ``\\``, spaces, ``:``, …) become ``_``; never empty, never starting with a dot."""
    name = _UNSAFE.sub("_", text).strip("_")
    if not name or name.startswith("."):
        name = "_" + name
    return name


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with ``-2``, ``-3``… appended to repeats (case-insensitively, for macOS/Windows)."""
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        candidate, k = name, 1
        while candidate.lower() in seen:
            k += 1
            candidate = f"{name}-{k}"
        seen.add(candidate.lower())
        out.append(candidate)
    return out


def sources_for(paths: Sequence[Path]) -> list[Source]:
    """Unique labels for ``paths``: relative to their common parent folder, suffix dropped."""
    resolved: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise StatisticsError(f"prediction CSV {path} does not exist: fix statistics.pred_csvs")
        r = path.resolve()
        if r not in resolved:
            resolved.append(r)
    common = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    labels = [r.relative_to(common).with_suffix("").as_posix() for r in resolved]
    slugs = unique_names(safe_name(label.replace("/", "_")) for label in labels)
    return [Source(r, label, slug) for r, label, slug in zip(resolved, labels, slugs, strict=True)]


def read_preds(path: Path) -> pd.DataFrame:
    """The CSV as strings (missing values NaN), so class labels like ``1`` stay ``"1"``.

    Cells we guarded against spreadsheet formulas (:func:`stamp.escaping.csv_safe`) are
    read back as written before the guard (a patient id ``=1+1`` stays ``=1+1``).
    """
    try:
        df = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as exc:
        raise StatisticsError(f"cannot read prediction CSV {path}: {exc}".splitlines()[0]) from exc
    if df.empty:
        raise StatisticsError(
            f"prediction CSV {path} has no rows: point statistics.pred_csvs at a filled file"
        )
    return csv_unguard_frame(df)


def require_columns(df: pd.DataFrame, path: Path, columns: Iterable[str], what: str) -> None:
    """Raise naming the CSV, the first missing column and which config key to fix."""
    for col in columns:
        if col not in df.columns:
            raise StatisticsError(
                f"prediction CSV {path} has no column {col!r}: set statistics.{what} to one of its "
                f"columns ({', '.join(map(repr, df.columns[:12]))})"
            )


def numeric_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    """Column ``col`` as float64; non-numbers raise naming the CSV, the column and the value."""
    column = df[col]
    try:  # Python's float parsing round-trips the written digits exactly (pd.to_numeric may not)
        return column.astype(np.float64).to_numpy()
    except (TypeError, ValueError):
        for raw in column.dropna():
            try:
                float(raw)
            except (TypeError, ValueError):
                raise StatisticsError(
                    f"prediction CSV {path} column {col!r} holds a non-number ({raw!r}): "
                    "fix the file or the configured column name"
                ) from None
        raise


def classification_targets(
    df: pd.DataFrame, path: Path, ground_truth_label: str | list[str] | None
) -> list[str]:
    """The ground-truth column(s); inferred from ``pred`` / ``pred_<target>`` columns when not configured."""
    if isinstance(ground_truth_label, str):
        targets = [ground_truth_label]
    elif ground_truth_label:
        targets = list(ground_truth_label)
    else:
        cols = list(df.columns)
        if "pred" in cols and cols.index("pred") > 0:
            targets = [cols[cols.index("pred") - 1]]
        else:
            targets = [c[5:] for c in cols if c.startswith("pred_") and c[5:] in cols]
        if not targets:
            raise StatisticsError(
                f"prediction CSV {path}: cannot tell the ground-truth column, set statistics.ground_truth_label"
            )
    require_columns(df, path, targets, "ground_truth_label")
    return targets


@dataclass
class ClassData:
    """One classification target of one CSV, rows without ground truth dropped.

    ``y[i]`` indexes ``classes``; ``probs`` is (n, n_classes) in the order of ``classes``.
    """

    target: str
    classes: list[str]
    y: np.ndarray
    probs: np.ndarray

    @property
    def argmax(self) -> np.ndarray:
        """Predicted class index per patient (argmax of the probabilities)."""
        return self.probs.argmax(axis=1)


def _class_columns(df: pd.DataFrame, target: str, targets: Sequence[str]) -> dict[str, str]:
    """``{class: column}`` for columns ``<target>_<class>``, not claimed by a longer target name."""
    longer = [t for t in targets if t != target and t.startswith(target + "_")]
    out: dict[str, str] = {}
    for col in df.columns:
        if not col.startswith(target + "_") or any(col.startswith(t + "_") for t in longer):
            continue
        out[col[len(target) + 1 :]] = col
    return out


def _as_class(value: str, classes: Sequence[str]) -> str:
    """``value``, or the class it spells as a float (``"1.0"`` → ``"1"``, from a spreadsheet round trip)."""
    if value in classes:
        return value
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer() and str(int(number)) in classes:
        return str(int(number))
    return value


def classification_data(df: pd.DataFrame, path: Path, target: str, targets: Sequence[str]) -> ClassData:
    """Validate and extract one target's ground truth and class probabilities from a CSV."""
    columns = _class_columns(df, target, targets)
    if len(columns) < 2:
        raise StatisticsError(
            f"prediction CSV {path} has {len(columns)} probability column(s) '{target}_<class>' for target "
            f"{target!r}: pass a classification patient-preds CSV or fix statistics.ground_truth_label"
        )
    classes = list(columns)
    gt = df[target]
    keep = gt.notna().to_numpy() & (gt.astype(str).str.strip() != "").to_numpy()
    if not keep.any():
        raise StatisticsError(
            f"prediction CSV {path} has no ground truth in column {target!r}: statistics need labelled patients"
        )
    truth = gt[keep].astype(str).str.strip().map(lambda v: _as_class(v, classes))
    unknown = sorted(set(truth) - set(classes))
    if unknown:
        raise StatisticsError(
            f"prediction CSV {path} column {target!r} holds {unknown[0]!r}, which has no probability column "
            f"'{target}_{unknown[0]}': use the CSV written for this ground truth"
        )
    probs = np.stack([numeric_column(df, columns[c], path)[keep] for c in classes], axis=1)
    if np.isnan(probs).any():
        raise StatisticsError(
            f"prediction CSV {path} has empty probabilities for target {target!r}: re-run deploy"
        )
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in truth], dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise StatisticsError(
            f"prediction CSV {path} column {target!r} holds one class only ({classes[y[0]]!r}): "
            "AUROC needs patients of at least two classes"
        )
    return ClassData(target, classes, y, probs)


def _clean(value: object) -> object:
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_row(row: dict[str, object]) -> dict[str, object]:
    """``row`` with numpy scalars as Python values and NaN/inf as ``None`` (JSON-safe)."""
    return {k: _clean(v) for k, v in row.items()}


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` as CSV (no index) atomically, text cells guarded against formulas; return the path."""
    with atomic_path(path) as tmp:
        csv_safe_frame(df).to_csv(tmp, index=False)
    return Path(path)
