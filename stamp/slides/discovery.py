"""Find the slides to process: a ``wsi_list`` file or a recursive search of ``wsi_dir``.

Differences from STAMP, on purpose:

* Extensions match case-insensitively (STAMP's glob is case-sensitive, so ``X.SVS`` is lost there).
* The result is sorted (deterministic). STAMP shuffles so concurrent jobs rarely collide; our
  orchestrator schedules slides itself and caches by content, so order only needs to be stable.
* ``.dcm``: a DICOM WSI is a folder of ``.dcm`` files (one per level); each folder yields one slide
  (its first ``.dcm`` file in sorted order), and only if OpenSlide recognises it as DICOM.
* ``.mrxs`` companion folders (``<stem>/`` next to ``<stem>.mrxs``), hidden folders and AppleDouble
  files (``._*``) are not searched.
* Symlinked folders are followed, but each folder (device, inode) is searched once: a symlink loop
  is skipped with a warning instead of walking ~2^40 paths, and a folder reachable through two
  paths yields its slides once (under the first path in sorted walk order).

``wsi_list``: ``.txt`` (one entry per line), ``.csv`` (first column), ``.xlsx``/``.xlsm`` (first
column of the first sheet); no header row (as in STAMP); entries are paths relative to ``wsi_dir``
(absolute paths are kept). Listed files are returned **whether or not they exist**: a missing one is
logged here and becomes that slide's error (``file not found``) when it is opened, so one typo never
stops the rest of the cohort (contract 6). A missing ``wsi_dir`` or list file raises
``FileNotFoundError``; an unsupported list format raises ``ValueError``.

In a watcher-started run (:func:`stamp.confinement.enforced`) every listed entry and every slide found
must resolve inside the cohort's allowed folders, else :class:`~stamp.config.ConfigError` names it.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from stamp.confinement import check_input

_logger = logging.getLogger("stamp")

SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".svslide",
    ".bif",
    ".qptiff",
    ".czi",
    ".dcm",
)
_EXTENSIONS = frozenset(SLIDE_EXTENSIONS)


def is_slide_name(name: str) -> bool:
    """Whether a file name carries one of :data:`SLIDE_EXTENSIONS` (any case)."""
    return not name.startswith("._") and os.path.splitext(name)[1].lower() in _EXTENSIONS


def _is_dicom_wsi(path: Path) -> bool:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) == "dicom"
    except Exception:
        return False


def _search(wsi_dir: Path) -> list[Path]:
    """Walk ``wsi_dir``, following symlinked folders, but entering each folder (device, inode) once.

    A symlink loop (``a -> .``) or a second link to a folder already searched is skipped with
    a warning, so the walk ends and a slide reachable through two paths is returned once,
    under the first path in (sorted, depth-first) walk order.
    """
    found: list[Path] = []
    visited: dict[tuple[int, int], Path] = {}
    for root, dirs, files in os.walk(wsi_dir, followlinks=True):
        root_path = Path(root)
        try:
            st = os.stat(root_path)
        except OSError as exc:
            _logger.warning("%s: not searched (%s)", root_path, exc.strerror)
            dirs[:] = []
            continue
        first = visited.setdefault((st.st_dev, st.st_ino), root_path)
        if first != root_path:
            _logger.warning(
                "%s leads to a folder already searched as %s (a symlink loop or a second link); "
                "not searching it again",
                root_path,
                first,
            )
            dirs[:] = []
            continue
        files = sorted(f for f in files if is_slide_name(f))
        mrxs_stems = {os.path.splitext(f)[0] for f in files if f.lower().endswith(".mrxs")}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in mrxs_stems)
        dicom = [f for f in files if f.lower().endswith(".dcm")]
        found.extend(root_path / f for f in files if not f.lower().endswith(".dcm"))
        if dicom and _is_dicom_wsi(root_path / dicom[0]):
            found.append(root_path / dicom[0])
    return [check_input(path, f"slide {path}") for path in found]


def _read_list(wsi_list: Path) -> list[str]:
    suffix = wsi_list.suffix.lower()
    if suffix == ".txt":
        entries = wsi_list.read_text(encoding="utf-8-sig").splitlines()
    elif suffix == ".csv":
        with open(wsi_list, newline="", encoding="utf-8-sig") as f:
            entries = [row[0] if row else "" for row in csv.reader(f)]
    elif suffix in (".xlsx", ".xlsm"):
        import openpyxl

        wb = openpyxl.load_workbook(wsi_list, read_only=True, data_only=True)
        try:
            ws = wb.worksheets[0]
            entries = [
                str(row[0]) if row and row[0] is not None else "" for row in ws.iter_rows(values_only=True)
            ]
        finally:
            wb.close()
    elif suffix == ".xls":
        raise ValueError(f"{wsi_list}: legacy .xls is not supported; save the list as .xlsx, .csv or .txt")
    else:
        raise ValueError(f"{wsi_list}: unsupported wsi_list format {suffix!r}; use .txt, .csv or .xlsx")
    return [e.strip() for e in entries if e and e.strip()]


def find_slides(wsi_dir: Path | str, wsi_list: Path | str | None = None) -> list[Path]:
    """Slides to process, sorted. From ``wsi_list`` if given, else a recursive search of ``wsi_dir``."""
    wsi_dir = Path(wsi_dir)
    if wsi_list is not None:
        wsi_list = Path(wsi_list)
        if not wsi_list.is_file():
            raise FileNotFoundError(f"wsi_list {wsi_list} does not exist")
        seen: set[Path] = set()
        slides: list[Path] = []
        for entry in _read_list(wsi_list):
            path = check_input(os.path.normpath(wsi_dir / entry), f"{wsi_list}: entry {entry!r}")
            if path in seen:
                continue
            seen.add(path)
            if not path.exists():
                _logger.warning("%s lists %r but %s does not exist", wsi_list, entry, path)
            slides.append(path)
        return sorted(slides)
    if not wsi_dir.is_dir():
        raise FileNotFoundError(f"wsi_dir {wsi_dir} does not exist or is not a directory")
    return sorted(_search(wsi_dir))
