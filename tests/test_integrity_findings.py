"""The security review's integrity findings, each reproduction turned into a test (DESIGN contract 4).

An output is reused only when its own recorded provenance equals what this run would write; an
existing file or folder that we did not write (no record of ours, or ours for another slide) is
never replaced or deleted: that item fails with one line naming the path.

* M5 / L4 (preprocess): another slide's h5 at a slide's output name, attrs that claim a computation
  without its record, foreign files at output names, two slides mapping to one h5, cached results
  served or placed over files that are not what the cache says.
* L1: placing cached outputs never writes through a symlink planted at a predictable temp name.
* H2 (heatmaps): a slide named like a sibling results folder never deletes that folder.

Library level with the weight-free ``demo`` encoder and small synthetic slides; one heatmaps test
runs the real Prefect flow.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from stamp.config_models import HeatmapsConfig
from stamp.encoders import load_encoder
from stamp.features import read_features, write_tile_features
from stamp.hashing import file_sha256
from stamp.heatmaps import HeatmapError, HeatmapJob, plan_heatmaps, render_slide
from stamp.heatmaps.render import check_heatmaps
from stamp.preprocessing import (
    PreprocessParams,
    SlideFailed,
    SlideReport,
    colliding_outputs,
    h5_path_for,
    output_paths,
    process_slide,
    serve_cached,
    slide_provenance,
)
from stamp.provenance import FOLDER_RECORD, Provenance, Verdict, read_record, record_path
from stamp.slides import TilingParams, find_slides
from stamp.synthetic import SlideSpec, write_slide
from tests.conftest import leftover_temps
from tests.test_heatmaps import MPP, H, W, _grid_features, _h5, _linear_ckpt

PARAMS = PreprocessParams(extractor="demo", tiling=TilingParams(max_workers=2))
CODE = "c0de" * 16


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- preprocess fixtures


@pytest.fixture(scope="module")
def encoder() -> Any:
    return load_encoder("demo")


@pytest.fixture(scope="module")
def pre(tmp_path_factory: pytest.TempPathFactory, encoder: Any) -> dict[str, Any]:
    """Slides X and Y (different tissue) and their finished outputs under ``ref/`` (with records)."""
    root = tmp_path_factory.mktemp("integrity-pre")
    out: dict[str, Any] = {"root": root}
    for name, seed in (("X", 11), ("Y", 12)):
        slide = root / "wsi" / f"{name}.svs"
        write_slide(slide, SlideSpec(width=2048, height=2048, mpp=0.5, seed=seed))
        sha = file_sha256(slide)
        h5 = root / "ref" / f"{name}.h5"
        report = process_slide(slide, h5, PARAMS, encoder, slide_sha256=sha, code=CODE)
        assert report.status == "done" and report.tiles_kept > 0
        out[name] = {"slide": slide, "sha": sha, "h5": h5, "feats": read_features(h5).feats, "report": report}
    assert not np.array_equal(out["X"]["feats"], out["Y"]["feats"])
    return out


def _expected(pre: dict[str, Any], encoder: Any, name: str = "X") -> Provenance:
    return slide_provenance(pre[name]["sha"], PARAMS, encoder.weights_sha256, CODE)


def _copy_unit(src_h5: Path, dst_h5: Path, *, record: bool = False) -> None:
    """Copy a slide's three output files (and, optionally, its record) to another slide's names."""
    dst_h5.parent.mkdir(parents=True, exist_ok=True)
    for kind, src in output_paths(src_h5).items():
        shutil.copy2(src, output_paths(dst_h5)[kind])
    if record:
        shutil.copy2(record_path(src_h5.parent, src_h5.name), record_path(dst_h5.parent, dst_h5.name))


def _slide_sha(h5: Path) -> str:
    with h5py.File(h5, "r") as f:
        value = f.attrs["slide_sha256"]
    return value.decode() if isinstance(value, bytes) else str(value)


def _process(
    pre: dict[str, Any], encoder: Any, h5: Path, name: str = "X", slide: Path | None = None
) -> SlideReport:
    info = pre[name]
    return process_slide(slide or info["slide"], h5, PARAMS, encoder, slide_sha256=info["sha"], code=CODE)


# --------------------------------------------------------------------------- M5 / L4: preprocess


def test_m5_h5_with_another_slides_record_at_x_output_fails_naming_the_path(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """M5 (a): Y's finished unit and record copied to X's names is Y's output: X fails, Y's bytes stay."""
    h5 = tmp_path / "out" / "X.h5"
    _copy_unit(pre["Y"]["h5"], h5, record=True)
    before = _tree(h5.parent)
    with pytest.raises(SlideFailed) as e:
        _process(pre, encoder, h5)
    assert str(h5) in e.value.reason and str(pre["Y"]["slide"].resolve()) in e.value.reason
    assert "\n" not in str(e.value)
    assert _tree(h5.parent) == before, "another slide's outputs are left alone"
    assert not leftover_temps(tmp_path)


def test_m5_cached_result_is_not_served_over_another_slides_h5(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """M5 (a): a cache hit for X whose h5 name holds Y's features is never reported as X's features.

    The review: ``place_finished`` (was ``_place``) skipped the existing ``out2/s1.h5`` (slide Y's) and reported it for X.
    """
    h5 = tmp_path / "out2" / "X.h5"
    _copy_unit(pre["Y"]["h5"], h5)  # Y's h5 + companions at X's names, without X's record
    report = pre["X"]["report"].as_dict()  # the cache record: X computed at ref/X.h5
    why = serve_cached(report, pre["X"]["slide"], h5, _expected(pre, encoder))
    assert why is not None and str(h5) in why, "Y's features must not be served as X's"
    assert _slide_sha(h5) == pre["Y"]["sha"], "not served, and not silently overwritten either"
    # what the flow does next (the task again with refresh_cache): another slide's h5 is not ours to
    # replace, so X fails with a line naming the path and Y's file stays as it is
    before = h5.read_bytes()
    with pytest.raises(SlideFailed, match=re.escape(str(h5))):
        _process(pre, encoder, h5)
    assert h5.read_bytes() == before


def test_m5_cached_result_whose_files_changed_is_not_served(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """M5: a cache hit is trusted only if the origin's files are the recorded ones, not because they exist."""
    origin = tmp_path / "out1" / "X.h5"
    _copy_unit(pre["X"]["h5"], origin, record=True)
    report = {**pre["X"]["report"].as_dict(), "h5": str(origin)}
    shutil.copy2(pre["Y"]["h5"], origin)  # the file the cache points at now holds Y's features
    h5 = tmp_path / "out2" / "X.h5"
    why = serve_cached(report, pre["X"]["slide"], h5, _expected(pre, encoder))
    assert why is not None and "X.h5" in why
    assert not h5.exists(), "nothing placed from a changed origin"
    # served in place too: the same hit at its own path is refused
    assert serve_cached(report, pre["X"]["slide"], origin, _expected(pre, encoder)) is not None


def test_l4_forged_attrs_without_a_record_are_not_reused(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """L4 (b): Y's features with attrs copied from X's h5 (all public) and no sidecar record are recomputed."""
    h5 = tmp_path / "out" / "X.h5"
    _copy_unit(pre["X"]["h5"], h5)  # X's thumbnail and GeoJSON, no record
    shutil.copy2(pre["Y"]["h5"], h5)
    with h5py.File(pre["X"]["h5"], "r") as src, h5py.File(h5, "r+") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
    for key in ("stamp_provenance", "slide_sha256", "config_sha256", "weights_sha256", "code_hash"):
        assert read_features(h5).attrs[key] == read_features(pre["X"]["h5"]).attrs[key], key
    assert not record_path(h5.parent, h5.name).exists()
    # a cache hit pointing at it is not served ...
    report = {**pre["X"]["report"].as_dict(), "h5": str(h5)}
    assert serve_cached(report, pre["X"]["slide"], h5, _expected(pre, encoder)) is not None
    # ... and the slide itself is computed again, not reused
    again = _process(pre, encoder, h5)
    assert again.status == "done"
    np.testing.assert_array_equal(read_features(h5).feats, pre["X"]["feats"])
    assert not np.array_equal(read_features(h5).feats, pre["Y"]["feats"])
    assert record_path(h5.parent, h5.name).is_file()


def _text(path: Path) -> None:
    path.write_bytes(b"a lab member's notes, not features\n")


def _stamp_h5(path: Path) -> None:  # what original STAMP writes: no provenance of ours
    coords = np.array([[0.0, 0.0], [256.0, 0.0]], np.float32)
    write_tile_features(path, np.ones((2, 8), np.float32), coords, extractor="demo", tile_size_um=256.0,
                        tile_size_px=224, code_hash="deadbeef")  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "make"),
    [("h5", _text), ("h5", _stamp_h5), ("thumbnail", _text)],
    ids=["text-at-h5", "stamp-h5-without-our-attrs", "text-at-thumbnail"],
)
def test_m5_foreign_file_at_an_output_name_fails_and_is_left_alone(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
    kind: str,
    make: Any,
) -> None:
    """M5 (c): a file we did not write at one of X's output names fails X with a line naming it."""
    h5 = tmp_path / "out" / "X.h5"
    h5.parent.mkdir()
    foreign = output_paths(h5)[kind]
    make(foreign)
    before = foreign.read_bytes()
    with pytest.raises(SlideFailed) as e:
        _process(pre, encoder, h5)
    assert str(foreign) in e.value.reason and "not written by stamp" in e.value.reason
    assert "\n" not in str(e.value)
    assert foreign.read_bytes() == before
    others = [p for k, p in output_paths(h5).items() if k != kind]
    assert not any(p.exists() for p in others), "nothing of the unit is published beside it"
    assert not record_path(h5.parent, h5.name).exists() and not leftover_temps(tmp_path)


def test_m5_second_slide_with_the_same_name_does_not_overwrite_the_first(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """M5 (d): two configs (wsi_dir A and B) writing ``s1.h5`` into one folder: the second fails, naming the first."""
    a, b, same = tmp_path / "A" / "s1.svs", tmp_path / "B" / "s1.svs", tmp_path / "C" / "s1.svs"
    for slide, src in ((a, "X"), (b, "Y"), (same, "X")):
        slide.parent.mkdir()
        shutil.copy2(pre[src]["slide"], slide)
    h5 = tmp_path / "feat" / "s1.h5"
    assert _process(pre, encoder, h5, "X", slide=a).status == "done"
    before = _tree(h5.parent)
    with pytest.raises(SlideFailed) as e:
        _process(pre, encoder, h5, "Y", slide=b)
    assert str(a.resolve()) in e.value.reason and str(h5) in e.value.reason
    assert _tree(h5.parent) == before and _slide_sha(h5) == pre["X"]["sha"]
    # the same bytes under another folder are the same slide: its finished outputs are reused
    assert _process(pre, encoder, h5, "X", slide=same).status == "reused"


def test_m5_slides_sharing_one_h5_name_are_refused_by_the_flow(tmp_path: Path) -> None:
    """M5 (d): wsi_list slides outside wsi_dir with one file name both map to ``s1.h5``: both refused."""
    wsi, feat = tmp_path / "wsi", tmp_path / "feat"
    slides = [tmp_path / "data" / "A" / "s1.svs", tmp_path / "data" / "B" / "s1.svs", wsi / "t2.svs"]
    h5s = {s: h5_path_for(s, wsi, feat) for s in slides}
    assert h5s[slides[0]] == h5s[slides[1]] == feat / "s1.h5"
    refused = colliding_outputs(h5s)
    assert set(refused) == set(slides[:2])
    for reason in refused.values():
        assert "s1.h5" in reason and all(str(s) in reason for s in slides[:2]) and "\n" not in reason


def test_m5_symlinked_subfolders_keep_distinct_h5_paths(tmp_path: Path) -> None:
    """M5 (e): wsi/linkA/s1.svs and wsi/linkB/s1.svs (symlinks out of wsi_dir) get two h5 files."""
    wsi, feat = tmp_path / "wsi", tmp_path / "feat"
    wsi.mkdir()
    for name in ("A", "B"):
        (tmp_path / "store" / name).mkdir(parents=True)
        (tmp_path / "store" / name / "s1.svs").write_bytes(f"slide {name}".encode())
        (wsi / f"link{name}").symlink_to(tmp_path / "store" / name, target_is_directory=True)
    slides = find_slides(wsi)
    assert slides == [wsi / "linkA" / "s1.svs", wsi / "linkB" / "s1.svs"]
    h5s = {s: h5_path_for(s, wsi, feat) for s in slides}
    assert sorted(h5s.values()) == [feat / "linkA" / "s1.h5", feat / "linkB" / "s1.h5"]
    assert colliding_outputs(h5s) == {}


def test_l1_placing_cached_outputs_does_not_follow_planted_temp_symlinks(
    pre: dict[str, Any],
    encoder: Any,
    tmp_path: Path,
) -> None:
    """L1: ``place_finished`` (was ``_place``) used ``.<name>.<pid>.tmp`` + ``copy2``; symlinks planted there must not be written through."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    h5 = tmp_path / "shared" / "X.h5"
    h5.parent.mkdir()
    for dst in output_paths(h5).values():
        for name in (f".{dst.name}.{os.getpid()}.tmp", f".{dst.name}.tmp"):
            (h5.parent / name).symlink_to(victim)
    report = pre["X"]["report"].as_dict()
    assert serve_cached(report, pre["X"]["slide"], h5, _expected(pre, encoder)) is None
    assert victim.read_bytes() == b"do not touch"
    assert not h5.is_symlink() and h5.read_bytes() == pre["X"]["h5"].read_bytes()
    assert not leftover_temps(h5.parent)


# --------------------------------------------------------------------------- H2: heatmaps


@pytest.fixture(scope="module")
def hm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two slides (``crossval.svs`` and ``other.svs``) with tile features, and a tiny checkpoint."""
    root = tmp_path_factory.mktemp("integrity-hm")
    slides = {}
    for name, seed in (("crossval", 4), ("other", 5)):
        truth = write_slide(root / "wsi" / f"{name}.svs", SlideSpec(width=W, height=H, mpp=MPP, seed=seed))
        coords, feats, _ = _grid_features(truth, seed=seed)
        _h5(root / "feat" / f"{name}.h5", coords, feats)
        slides[name] = truth.slide_path
    return {"root": root, "slides": slides, "ckpt": _linear_ckpt(root / "model.ckpt")}


def _work_with_crossval(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An output_dir that already holds an unrelated ``crossval/`` results folder (no record of ours)."""
    work = tmp_path / "work"
    (work / "crossval" / "split-0").mkdir(parents=True)
    (work / "crossval" / "model.ckpt").write_bytes(b"trained weights")
    (work / "crossval" / "splits.json").write_text('{"splits": [[1, 2], [3]]}')
    (work / "crossval" / "split-0" / "patient-preds.csv").write_text("PATIENT,pred\nP1,MSIH\n")
    return work, _tree(work / "crossval")


def _section(hm: dict[str, Any], out: Path) -> HeatmapsConfig:
    root = hm["root"]
    return HeatmapsConfig(output_dir=out, feature_dir=root / "feat", wsi_dir=root / "wsi",
                          checkpoint_path=hm["ckpt"], device="cpu", ig_steps=1)  # fmt: skip


def test_h2_slide_named_like_a_results_folder_does_not_delete_it(hm: dict[str, Any], tmp_path: Path) -> None:
    """H2: ``crossval.svs`` maps to ``work/crossval`` (someone's crossval results): it fails, the folder stays."""
    work, before = _work_with_crossval(tmp_path)
    jobs = {j.name: j for j in plan_heatmaps(_section(hm, work))}
    assert jobs["crossval"].output_dir == work / "crossval"
    with pytest.raises(HeatmapError) as e:
        render_slide(jobs["crossval"], hm["ckpt"], device="cpu", ig_steps=1)
    assert str(work / "crossval") in str(e.value) and "not written by stamp" in str(e.value)
    assert "\n" not in str(e.value)
    assert _tree(work / "crossval") == before, "model.ckpt and splits.json must be byte-identical"
    other = render_slide(jobs["other"], hm["ckpt"], device="cpu", ig_steps=1)
    assert other.overview.is_file() and (work / "other" / FOLDER_RECORD).is_file()
    assert not leftover_temps(work)


def test_h2_our_heatmaps_folder_is_replaced_when_settings_change(hm: dict[str, Any], tmp_path: Path) -> None:
    """H2: a folder with our record for the same slide is ours: replaced on rerun with another opacity."""
    job = HeatmapJob(
        hm["slides"]["other"], hm["root"] / "feat" / "other.h5", tmp_path / "out" / "other", "other"
    )
    first = render_slide(job, hm["ckpt"], opacity=0.6, device="cpu", ig_steps=1)
    overlay = job.output_dir / "raw" / "raw-overlay-other-MSIH.png"
    rec1, png1 = read_record(job.output_dir / FOLDER_RECORD), overlay.read_bytes()
    assert rec1 is not None and rec1.provenance["settings"]["opacity"] == 0.6
    assert check_heatmaps(job, hm["ckpt"], opacity=0.6, ig_steps=1).reusable
    stale = check_heatmaps(job, hm["ckpt"], opacity=0.2, ig_steps=1)
    assert stale.verdict is Verdict.STALE and "settings.opacity" in stale.reason
    second = render_slide(job, hm["ckpt"], opacity=0.2, device="cpu", ig_steps=1)
    rec2 = read_record(job.output_dir / FOLDER_RECORD)
    assert rec2 is not None and rec2.key != rec1.key and rec2.provenance["settings"]["opacity"] == 0.2
    assert overlay.read_bytes() != png1 and sorted(second.files) == sorted(first.files)
    assert check_heatmaps(job, hm["ckpt"], opacity=0.2, ig_steps=1).reusable
    assert sorted(p.name for p in job.output_dir.parent.iterdir()) == ["other"]


def test_h2_heatmaps_folder_of_slide_a_is_not_replaced_by_slide_b(hm: dict[str, Any], tmp_path: Path) -> None:
    """H2/M5: slide B mapping to the folder we wrote for slide A fails naming A; A's heatmaps stay."""
    folder = tmp_path / "out" / "shared"
    feat = hm["root"] / "feat"
    job_a = HeatmapJob(hm["slides"]["crossval"], feat / "crossval.h5", folder, "a")
    job_b = HeatmapJob(hm["slides"]["other"], feat / "other.h5", folder, "b")
    render_slide(job_a, hm["ckpt"], device="cpu", ig_steps=1)
    before = _tree(folder)
    with pytest.raises(HeatmapError) as e:
        render_slide(job_b, hm["ckpt"], device="cpu", ig_steps=1)
    assert str(folder) in str(e.value) and str(hm["slides"]["crossval"].resolve()) in str(e.value)
    assert _tree(folder) == before and not leftover_temps(folder.parent)


@pytest.mark.usefixtures("prefect_api")
def test_h2_heatmaps_flow_fails_only_the_slide_named_like_a_results_folder(
    hm: dict[str, Any], tmp_path: Path
) -> None:
    """H2 through the real flow: the run's rows say "failed" with the folder for that slide, "done" for the other."""
    from stamp_flows.heatmaps import heatmaps_flow

    work, before = _work_with_crossval(tmp_path)
    result = heatmaps_flow(_section(hm, work).model_dump(mode="json"))
    rows = {r["slide"]: r for r in result["rows"]}
    assert rows["crossval"]["status"] == "failed" and str(work / "crossval") in rows["crossval"]["reason"]
    assert rows["other"]["status"] == "done" and Path(rows["other"]["overview"]).is_file()
    assert result["failed"] == 1
    assert _tree(work / "crossval") == before
