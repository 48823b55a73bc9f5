"""Reading STAMP's clinical and slide tables as text, and the cell-level rules used on them.

Tables (.csv / .tsv / .xlsx) are read with every cell as text; the tokens in :data:`NA_TOKENS` mean
"missing" (:func:`is_na`). :func:`parse_status` reads a survival status column and :func:`safe_name`
turns a label into a file-name part. Part of :mod:`stamp.cohort`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger("stamp")

NA_TOKENS: frozenset[str] = frozenset(
    {"", "NA", "N/A", "n/a", "na", "#N/A", "#N/A N/A", "#NA", "<NA>", "nan", "NaN", "-nan", "-NaN",
     "NAN", "None", "none", "NULL", "null", "-", "?", "-1.#IND", "1.#IND", "-1.#QNAN", "1.#QNAN"}
)  # fmt: skip
_NA_LOWER = frozenset(t.lower() for t in NA_TOKENS)
_EVENT = frozenset({"1", "event", "dead", "deceased", "died", "yes", "y", "true"})
_CENSORED = frozenset({"0", "alive", "censored", "no", "n", "false"})


def is_na(value: Any) -> bool:
    """True for None, NaN and the :data:`NA_TOKENS` (case-insensitive, surrounding blanks ignored)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float | np.floating):
        return bool(np.isnan(value))
    return isinstance(value, str) and value.strip().lower() in _NA_LOWER


def parse_status(value: str | float | None) -> float:
    """Survival status → 1.0 (event), 0.0 (censored) or NaN (missing / not understood)."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.number):
        v = float(value)
        return math.nan if not math.isfinite(v) or v < 0 else float(v > 0)
    if is_na(value):
        return math.nan
    text = str(value).strip().lower()
    if text in _EVENT:
        return 1.0
    if text in _CENSORED:
        return 0.0
    try:
        return parse_status(float(text))
    except ValueError:
        return math.nan


_UNSAFE = re.compile(r"[^\w.-]+")


def safe_name(label: str) -> str:
    """``label`` as a file-name part: unchanged if already safe, else cleaned + a short hash of it."""
    text = str(label)
    cleaned = _UNSAFE.sub("_", text).strip("._")
    if cleaned == text and cleaned and len(text) <= 100:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[:80] or 'label'}-{digest}"


def read_table(path: str | os.PathLike[str], columns: Sequence[str], *, what: str = "table") -> pd.DataFrame:
    """The ``columns`` of a .csv/.tsv/.xlsx table as text ("" for empty cells)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm", ".xls"):
        df = pd.read_excel(path, dtype=str, keep_default_na=False)
    elif suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)
        except UnicodeDecodeError:
            logger.warning("%s: not UTF-8, read as Latin-1 (save it as UTF-8 to be sure)", path)
            df = pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep, encoding="latin-1")
    else:
        raise ValueError(f"{path}: {what} must be .csv or .xlsx, not {suffix or 'no extension'}")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        hint = " (is it ';'- or tab-separated? use ',' or .xlsx)" if len(df.columns) == 1 else ""
        raise ValueError(
            f"{path}: {what} has no column {', '.join(map(repr, missing))}; "
            f"columns are {', '.join(map(repr, df.columns))}{hint}"
        )
    return df[list(dict.fromkeys(columns))]


def cell_text(value: Any) -> str | None:
    return None if is_na(value) else str(value).strip()
