"""Slide discovery: recursive search (case-insensitive) and wsi_list files."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from stamp.slides import SLIDE_EXTENSIONS, find_slides
from stamp.slides.discovery import is_slide_name


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def wsi_dir(tmp_path: Path) -> Path:
    root = tmp_path / "wsi"
    for rel in [
        "a.svs",
        "B.SVS",  # STAMP's case-sensitive glob loses this one
        "sub/c.tiff",
        "sub/deeper/d.Ndpi",
        "e.mrxs",
        "e/Data0001.dat",  # mrxs companion folder
        "e/nested.tif",  # inside the companion folder: not a slide of its own
        "notes.txt",
        "image.png",
        "._a.svs",  # AppleDouble resource fork
        ".hidden/x.svs",
        "dicom/level0.dcm",  # not a DICOM WSI OpenSlide recognises: skipped
        "dicom/level1.dcm",
    ]:
        _touch(root / rel)
    return root


def test_extensions_cover_stamp() -> None:
    stamp_exts = {
        ".czi",
        ".svs",
        ".tif",
        ".vms",
        ".vmu",
        ".ndpi",
        ".scn",
        ".mrxs",
        ".tiff",
        ".svslide",
        ".bif",
        ".qptiff",
    }
    assert stamp_exts <= set(SLIDE_EXTENSIONS)
    assert ".dcm" in SLIDE_EXTENSIONS
    assert is_slide_name("X.SVS") and is_slide_name("y.QpTiff") and not is_slide_name("z.png")


def test_recursive_search_case_insensitive_sorted(wsi_dir: Path) -> None:
    found = find_slides(wsi_dir)
    rel = [p.relative_to(wsi_dir).as_posix() for p in found]
    assert found == sorted(found)
    assert set(rel) == {"a.svs", "B.SVS", "sub/c.tiff", "sub/deeper/d.Ndpi", "e.mrxs"}
    assert found == find_slides(wsi_dir)  # deterministic


def test_missing_wsi_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wsi_dir"):
        find_slides(tmp_path / "nope")


def test_wsi_list_txt(wsi_dir: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("a.svs\n\n  sub/c.tiff  \nmissing.svs\na.svs\n")
    found = find_slides(wsi_dir, lst)
    assert found == sorted([wsi_dir / "a.svs", wsi_dir / "sub/c.tiff", wsi_dir / "missing.svs"])


def test_wsi_list_csv_without_header(wsi_dir: Path, tmp_path: Path) -> None:
    lst = tmp_path / "list.csv"
    # first row is data, not a header (STAMP reads with header=None); extra columns ignored
    lst.write_text("B.SVS,extra\nsub/deeper/d.Ndpi,more\n")
    assert find_slides(wsi_dir, lst) == [wsi_dir / "B.SVS", wsi_dir / "sub/deeper/d.Ndpi"]


def test_wsi_list_xlsx(wsi_dir: Path, tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    for row in (["sub/c.tiff", 1], ["a.svs", 2], [None, 3]):
        ws.append(row)
    lst = tmp_path / "list.xlsx"
    wb.save(lst)
    assert find_slides(wsi_dir, lst) == [wsi_dir / "a.svs", wsi_dir / "sub/c.tiff"]


def test_wsi_list_errors(wsi_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="wsi_list"):
        find_slides(wsi_dir, tmp_path / "absent.txt")
    bad = tmp_path / "list.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="unsupported wsi_list format"):
        find_slides(wsi_dir, bad)
    xls = tmp_path / "list.xls"
    xls.write_bytes(b"")
    with pytest.raises(ValueError, match="xlsx"):
        find_slides(wsi_dir, xls)


def test_missing_listed_slide_reports_on_open(wsi_dir: Path, tmp_path: Path) -> None:
    from stamp.slides import SlideOpenError, open_slide

    lst = tmp_path / "list.txt"
    lst.write_text("ghost.svs\n")
    (path,) = find_slides(wsi_dir, lst)
    with pytest.raises(SlideOpenError, match="file not found") as err:
        open_slide(path)
    assert "ghost.svs" in str(err.value)


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM raises in the main thread after ``seconds``."""

    def _expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"slide discovery still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_symlink_loop_ends(tmp_path: Path, stamp_log: pytest.LogCaptureFixture) -> None:
    """L6: two `-> .` links gave ~2^40 paths; each folder is now entered once."""
    root = tmp_path / "wsi"
    _touch(root / "x.svs")
    _touch(root / "sub" / "y.svs")
    (root / "a").symlink_to(".")
    (root / "b").symlink_to(".")
    with _deadline(10):
        found = find_slides(root)
    assert found == [root / "sub" / "y.svs", root / "x.svs"]
    warned = [r.getMessage() for r in stamp_log.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert str(root / "a") in warned[0] and str(root / "b") in warned[1]


def test_symlinked_folder_outside_wsi_dir_yields_its_slides_once(tmp_path: Path) -> None:
    """L6: linked-in cohorts are still searched, once, even when linked twice or linking back."""
    root = tmp_path / "wsi"
    _touch(root / "x.svs")
    outside = tmp_path / "elsewhere"
    _touch(outside / "z.svs")
    _touch(outside / "deep" / "w.tiff")
    (root / "cohort").symlink_to(outside)
    (root / "cohort-again").symlink_to(outside)
    (outside / "back").symlink_to(root)  # a loop through two links
    with _deadline(10):
        found = find_slides(root)
    assert found == [
        root / "cohort" / "deep" / "w.tiff",
        root / "cohort" / "z.svs",
        root / "x.svs",
    ]
