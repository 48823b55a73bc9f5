"""Names from users (slides, patients, classes, targets, files) in Markdown and CSV outputs.

* :func:`markdown_cell` / :func:`markdown_code`: one line of Markdown text / inline code
  that cannot open a new table row, link, image, HTML tag or emphasis.
* :func:`csv_safe` / :func:`csv_unguard`: a text cell that a spreadsheet would read as a
  formula (starts with ``=``, ``+``, ``-``, ``@``, tab or CR and is not a number) gets a
  leading ``'``; :func:`csv_unguard` is its exact inverse, used when we read our own CSVs,
  so a patient id ``=1+1`` round-trips. Numbers (``-0.5``, ``+3``) and one-character
  labels (``-``, ``+``) are never changed. :func:`csv_safe_frame` / :func:`csv_unguard_frame`
  apply them to the text (object) columns of a DataFrame; numeric columns are untouched.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_NEWLINES = re.compile(r"[\r\n\v\f\x85\u2028\u2029]+")
_MD_SPECIAL = re.compile(r"([\\|`\[\]<>*])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def markdown_cell(text: object) -> str:
    """``text`` as one line of literal Markdown (safe in a table cell, a heading or a bullet)."""
    s = _NEWLINES.sub(" ", "" if text is None else str(text))
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), s)


def markdown_code(text: object) -> str:
    """``text`` as one line of inline code (a path, a label); safe in a table cell."""
    s = _NEWLINES.sub(" ", "" if text is None else str(text)).replace("|", "\\|")
    runs = [len(r) for r in re.findall(r"`+", s)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or not s.strip() else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _needs_guard(s: str) -> bool:
    if len(s) > 1 and s.startswith(_FORMULA_START) and not _is_number(s):
        return True
    return s.startswith("'") and _needs_guard(s[1:])  # keeps csv_unguard an exact inverse


def csv_safe(value: Any) -> Any:
    """A text cell prefixed with ``'`` if a spreadsheet would read it as a formula; others unchanged."""
    return "'" + value if isinstance(value, str) and _needs_guard(value) else value


def csv_unguard(value: Any) -> Any:
    """The inverse of :func:`csv_safe`: the original text of a cell we wrote."""
    if isinstance(value, str) and value.startswith("'") and _needs_guard(value[1:]):
        return value[1:]
    return value


def _map_text_columns(df: pd.DataFrame, fn: Any) -> pd.DataFrame:
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    for i, dtype in enumerate(out.dtypes):
        if is_object_dtype(dtype) or is_string_dtype(dtype):
            out.isetitem(i, out.iloc[:, i].map(fn))
    return out


def csv_safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with :func:`csv_safe` applied to its text (object / string) columns."""
    return _map_text_columns(df, csv_safe)


def csv_unguard_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with :func:`csv_unguard` applied to its text (object / string) columns."""
    return _map_text_columns(df, csv_unguard)
