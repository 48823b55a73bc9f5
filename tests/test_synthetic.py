"""Synthetic slides and cohorts: OpenSlide sees what we promise, and the truth matches the pixels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from stamp.synthetic import (
    CohortInfo,
    SlideSpec,
    SlideTruth,
    load_cohort_truth,
    synth_command,
    write_cohort,
    write_slide,
)

SEED = 7
SIZE = 2048


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    return write_cohort(tmp_path_factory.mktemp("cohort") / "c", n_patients=8, seed=SEED, size=SIZE)


def _open(path: Path) -> openslide.OpenSlide:
    return openslide.OpenSlide(str(path))


def _tiles_of_kind(truth: SlideTruth, kind: str, size: int = 256, limit: int = 24) -> list[tuple[int, int]]:
    """Level-0 tile origins that are fully planted / fully stroma / fully background.

    Background tiles get a one-cell margin (their pixels are checked strictly):
    masks are exact only to about half a cell (16 px) at region boundaries.
    """
    m = truth.mask_downsample if kind == "background" else 0
    out = []
    for y in range(0, truth.height - size + 1, size):
        for x in range(0, truth.width - size + 1, size):
            t = truth.tissue_fraction_at(x - m, y - m, size + 2 * m, size + 2 * m)
            p = truth.planted_fraction_at(x - m, y - m, size + 2 * m, size + 2 * m)
            ok = {"planted": p == 1.0, "stroma": t == 1.0 and p == 0.0, "background": t == 0.0}[kind]
            if ok:
                out.append((x, y))
    return out[:limit]


def _read_rgb(slide: openslide.OpenSlide, x: int, y: int, size: int = 256, level: int = 0) -> np.ndarray:
    return np.asarray(slide.read_region((x, y), level, (size, size)).convert("RGB"), dtype=np.float32)


# ---------------------------------------------------------------- OpenSlide view of the slides


def test_cohort_slides_are_aperio_with_requested_mpp_and_pyramid(cohort: CohortInfo) -> None:
    mpps = set()
    for rec in cohort.slides:
        tr = rec.truth
        with _open(tr.slide_path) as s:
            props = s.properties
            assert openslide.OpenSlide.detect_format(str(tr.slide_path)) == "aperio"
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == tr.mpp
            assert float(props["openslide.mpp-y"]) == tr.mpp
            assert int(props["openslide.objective-power"]) == round(10 / tr.mpp)
            assert s.level_count >= 3
            assert s.level_dimensions == tuple(tuple(d) for d in tr.level_shapes)
            assert s.dimensions == (tr.width, tr.height)
            np.testing.assert_allclose(s.level_downsamples[:3], (1, 4, 16), rtol=0.02)
            assert set(s.associated_images) == {"thumbnail", "label", "macro"}
            assert s.associated_images["label"].size == (400, 400)  # LZW strips decode
            assert max(s.associated_images["thumbnail"].size) <= 768
            # the last, partial tile of level 0 reads fine
            assert s.read_region((tr.width - 10, tr.height - 10), 0, (10, 10)).size == (10, 10)
        mpps.add(tr.mpp)
    assert mpps == {0.25, 0.5}


def test_generic_variant_has_no_mpp(cohort: CohortInfo) -> None:
    tr = cohort.extras["generic_no_mpp"]
    assert isinstance(tr, SlideTruth) and tr.mpp is None
    with _open(tr.slide_path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert "openslide.mpp-x" not in s.properties
        assert s.level_count >= 3
        assert s.level_dimensions[1] == (tr.width // 4, tr.height // 4)


def test_generic_slide_with_mpp(tmp_path: Path) -> None:
    tr = write_slide(tmp_path / "g.tif", SlideSpec(width=1024, height=900, mpp=0.5, vendor="generic", seed=1))
    with _open(tr.slide_path) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert s.level_count == 3


def test_aperio_needs_mpp() -> None:
    with pytest.raises(ValueError, match="needs an mpp"):
        SlideSpec(mpp=None, vendor="aperio")
    with pytest.raises(ValueError, match="planted_fraction"):
        SlideSpec(planted_fraction=1.5)


# ---------------------------------------------------------------- ground truth vs. pixels


def test_tissue_fraction_and_planted_fraction_match_specs(cohort: CohortInfo) -> None:
    truth = json.loads(cohort.truth_json.read_text())
    for rec, row in zip(cohort.slides, truth["slides"], strict=True):
        tr = rec.truth
        assert 0.15 <= tr.tissue_fraction <= 0.5, rec.truth.slide_path.name
        if rec.label == "MSIH":
            assert 0.09 <= tr.planted_fraction <= 0.41
        else:
            assert tr.planted_fraction == 0.0
            assert json.loads(tr.biomarker_geojson.read_text())["features"] == []
        assert row["planted_fraction"] == pytest.approx(tr.planted_fraction, abs=1e-6)


def _raster(geojson: Path, shape: tuple[int, int], scale: float = 0.25) -> np.ndarray:
    """Fill a GeoJSON FeatureCollection's polygons (holes cut out) into a boolean image."""
    img = np.zeros(shape, np.uint8)
    for f in json.loads(geojson.read_text())["features"]:
        rings = [np.round(np.asarray(r) * scale).astype(np.int32) for r in f["geometry"]["coordinates"]]
        cv2.fillPoly(img, [rings[0]], 1)
        if len(rings) > 1:
            cv2.fillPoly(img, rings[1:], 0)
    return img.astype(bool)


def test_planted_regions_lie_inside_tissue(cohort: CohortInfo) -> None:
    positives = [r.truth for r in cohort.slides if r.label == "MSIH"]
    assert positives
    for tr in positives:
        tissue, planted = tr.masks()
        assert planted.sum() > 0
        assert not (planted & ~tissue).any()  # on the mask grid: strictly inside
        # and with the polygons (what QuPath would show), rasterised at 4 px
        shape = (tr.height // 4 + 1, tr.width // 4 + 1)
        t_img, p_img = _raster(tr.tissue_geojson, shape), _raster(tr.biomarker_geojson, shape)
        assert (p_img & t_img).sum() / p_img.sum() >= 0.99
        # polygons and PNG mask describe the same area (within the boundary resolution)
        d = tr.mask_downsample
        assert p_img.sum() * 16 == pytest.approx(planted.sum() * d * d, rel=0.06)


def test_planted_texture_differs_strongly_from_stroma_and_background_is_white(cohort: CohortInfo) -> None:
    pos = [r.truth for r in cohort.slides if r.label == "MSIH"]
    grey = {"planted": [], "stroma": [], "background": []}
    blue_ratio = {"planted": [], "stroma": []}
    for tr in pos:
        with _open(tr.slide_path) as s:
            for kind in grey:
                size = 256 if kind == "background" else 128  # 2048-px slides have few full 256 tiles
                for x, y in _tiles_of_kind(tr, kind, size=size, limit=6):
                    px = _read_rgb(s, x, y, size)
                    grey[kind].append(float(px.mean()))
                    if kind in blue_ratio:
                        blue_ratio[kind].append(float(px[..., 2].mean() / px[..., 0].mean()))
                    if kind == "background":
                        assert px.min() >= 225 and px.std() < 4
    assert min(len(v) for v in grey.values()) >= 5, {k: len(v) for k, v in grey.items()}
    # every planted tile is darker than every stroma tile, by a wide margin on average
    assert max(grey["planted"]) < min(grey["stroma"])
    assert np.mean(grey["stroma"]) - np.mean(grey["planted"]) > 30
    assert np.mean(blue_ratio["planted"]) > np.mean(blue_ratio["stroma"]) + 0.05
    assert min(grey["background"]) > 238


def test_tissue_mask_matches_pixels(cohort: CohortInfo) -> None:
    """Cells of the PNG mask vs. the painted pixels (level 1, one cell = 8 x 8 px there)."""
    for rec in cohort.slides:
        tr = rec.truth
        tissue, planted = tr.masks()
        with _open(tr.slide_path) as s:
            img = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("L"), np.float32)
        c = tr.mask_downsample // 4
        mh, mw = tissue.shape
        img = np.pad(img, ((0, mh * c - img.shape[0]), (0, mw * c - img.shape[1])), constant_values=244)
        blocks = img.reshape(mh, c, mw, c)
        painted = (blocks < 238).mean(axis=(1, 3)) >= 0.5  # glass is ~244, tissue pixels darker
        assert (painted == tissue).mean() > 0.98, tr.slide_path.name
        cell_grey = blocks.mean(axis=(1, 3))
        if planted.any():
            assert cell_grey[planted].mean() < cell_grey[tissue & ~planted].mean() - 30


def test_truth_queries_and_roundtrip(cohort: CohortInfo) -> None:
    tr = max((r.truth for r in cohort.slides if r.label == "MSIH"), key=lambda t: t.planted_fraction)
    loaded = SlideTruth.load(tr.slide_path)
    assert loaded == tr
    assert loaded.tissue_fraction_at(0, 0, tr.width, tr.height) == pytest.approx(tr.tissue_fraction, rel=0.05)
    tissue, planted = loaded.masks()
    assert loaded.planted_fraction_at(0, 0, tr.width, tr.height) == pytest.approx(
        tr.planted_fraction * tr.tissue_fraction, rel=0.05
    )
    iy, ix = np.argwhere(planted)[0]
    d = tr.mask_downsample
    assert loaded.planted_fraction_at(ix * d, iy * d, d, d) == 1.0
    assert loaded.tissue_fraction_at(ix * d + 5, iy * d + 5, d / 2, d / 4) == 1.0
    # half of a rectangle straddling the planted cell and a cell to its left/right that is not planted
    jx = ix - 1 if not planted[iy, ix - 1] else ix + 1
    if not planted[iy, jx]:
        assert loaded.planted_fraction_at(min(ix, jx) * d, iy * d, 2 * d, d) == pytest.approx(0.5)
    assert loaded.tissue_fraction_at(-500, -500, 100, 100) == 0.0
    reloaded = load_cohort_truth(cohort.root)
    assert [r.truth for r in reloaded.slides] == [r.truth for r in cohort.slides]


def test_geojson_is_a_qupath_feature_collection_with_holes(cohort: CohortInfo) -> None:
    n_holes = 0
    for rec in cohort.slides:
        tr = rec.truth
        fc = json.loads(tr.tissue_geojson.read_text())
        assert fc["type"] == "FeatureCollection" and fc["features"]
        assert fc["stamp_synthetic"]["mask_downsample"] == tr.mask_downsample
        for f in fc["features"]:
            assert f["geometry"]["type"] == "Polygon"
            assert f["properties"]["classification"]["name"] == "Tissue"
            for ring in f["geometry"]["coordinates"]:
                a = np.asarray(ring)
                assert len(a) >= 4 and (a[0] == a[-1]).all()
                assert a[:, 0].min() >= 0 and a[:, 0].max() <= tr.width
                assert a[:, 1].min() >= 0 and a[:, 1].max() <= tr.height
            n_holes += len(f["geometry"]["coordinates"]) - 1
    assert n_holes > 0


# ---------------------------------------------------------------- cohort tables


def test_cohort_tables(cohort: CohortInfo) -> None:
    clini = pd.read_csv(cohort.clini_table)
    slides = pd.read_csv(cohort.slide_table)
    assert list(clini.columns) == ["PATIENT", "isMSIH", "TMB", "OS_time", "OS_event"]
    assert list(slides.columns) == ["PATIENT", "FILENAME"]
    assert clini["PATIENT"].is_unique and len(clini) == 8
    assert set(clini["isMSIH"]) == {"MSIH", "nonMSIH"}
    assert (clini["isMSIH"] == "MSIH").sum() == 4
    assert set(clini["OS_event"]) <= {0, 1} and (clini["OS_time"] > 0).all()
    assert set(slides["PATIENT"]) == set(clini["PATIENT"])
    assert slides["FILENAME"].is_unique and slides["FILENAME"].str.endswith(".h5").all()
    stems = {p.stem for p in cohort.slides_dir.glob("*.svs")}
    assert {f[: -len(".h5")] for f in slides["FILENAME"]} == stems
    hidden = [p.name for p in cohort.root.rglob(".*")]
    assert hidden == [".synthetic-cohort.provenance.json"]  # no temp files or build folders left
    counts = slides.groupby("PATIENT").size()
    assert (counts == 2).sum() >= 2 and (counts == 1).sum() >= 2
    # no slide-like file besides the cohort's slides under slides/ (extras live elsewhere)
    assert sorted(
        p.name for p in cohort.slides_dir.iterdir() if p.suffix in {".svs", ".tif", ".tiff"}
    ) == sorted(f"{s}.svs" for s in stems)


def test_outcomes_depend_on_planted_fraction(cohort: CohortInfo) -> None:
    truth = json.loads(cohort.truth_json.read_text())
    pf = {p["PATIENT"]: p["planted_fraction"] for p in truth["patients"]}
    clini = pd.read_csv(cohort.clini_table)
    clini["pf"] = clini["PATIENT"].map(pf)
    assert (clini.loc[clini["isMSIH"] == "MSIH", "pf"] > 0.05).all()
    assert (clini.loc[clini["isMSIH"] == "nonMSIH", "pf"] == 0).all()
    assert clini["pf"].corr(clini["TMB"], method="spearman") > 0.5
    assert clini["pf"].corr(clini["OS_time"], method="spearman") > 0.5


def test_default_cohort_outcomes_correlate(tmp_path: Path) -> None:
    """The cohort `stamp synth` writes by default (12 patients), at a small size."""
    info = synth_command(tmp_path / "d", patients=12, seed=0, size=1024, variants=False)
    clini = pd.read_csv(info.clini_table)
    clini["pf"] = clini["PATIENT"].map({p["PATIENT"]: p["planted_fraction"] for p in info.patients})
    assert clini["pf"].corr(clini["TMB"], method="spearman") > 0.5
    assert clini["pf"].corr(clini["OS_time"], method="spearman") > 0.5
    assert not (tmp_path / "d" / "extras").exists()
    assert "12 patients" in info.summary


# ---------------------------------------------------------------- broken variants


def test_truncated_slide_fails(cohort: CohortInfo) -> None:
    path = cohort.extras["truncated"]
    assert isinstance(path, Path)
    # it fails on open (the IFD chain is cut); failing while reading would be the other acceptable place
    with pytest.raises(openslide.OpenSlideError), _open(path) as s:
        w, h = s.dimensions
        for y in range(0, h, 256):
            for x in range(0, w, 256):
                s.read_region((x, y), 0, (256, 256))


def test_not_a_slide_is_unsupported(cohort: CohortInfo) -> None:
    path = cohort.extras["not_a_slide"]
    assert isinstance(path, Path) and path.suffix == ".svs"
    assert openslide.OpenSlide.detect_format(str(path)) is None
    with pytest.raises(openslide.OpenSlideUnsupportedFormatError):
        _open(path)


def test_corrupt_tiles_open_but_fail_on_read(cohort: CohortInfo) -> None:
    tr = cohort.extras["corrupt_tiles"]
    assert isinstance(tr, SlideTruth)
    with _open(tr.slide_path) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        s.read_region((0, 0), 2, s.level_dimensions[2])  # lower levels are intact
        s.read_region((0, 0), 0, (256, 256))  # first row of tiles too
        with pytest.raises(openslide.OpenSlideError):
            s.read_region((tr.width // 2, tr.height // 2), 0, (256, 256))


def test_blank_slide_opens_without_tissue(cohort: CohortInfo) -> None:
    tr = cohort.extras["blank"]
    assert isinstance(tr, SlideTruth)
    assert tr.tissue_fraction == 0.0 and tr.planted_fraction == 0.0
    assert json.loads(tr.tissue_geojson.read_text())["features"] == []
    with _open(tr.slide_path) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        img = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB"))
        assert img.min() >= 225 and img.std() < 3


# ---------------------------------------------------------------- determinism and housekeeping


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(cohort: CohortInfo, tmp_path: Path) -> None:
    again = write_cohort(tmp_path / "again", n_patients=8, seed=SEED, size=SIZE)
    a, b = _files(cohort.root), _files(again.root)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = write_cohort(tmp_path / "other", n_patients=8, seed=SEED + 1, size=SIZE, variants=False)
    c = _files(other.root)
    assert c["clini.csv"] != a["clini.csv"]
    common = [k for k in c if k.endswith(".svs") and k in a]
    assert common and all(c[k] != a[k] for k in common)


def test_same_bytes_in_a_fresh_process(tmp_path: Path) -> None:
    """Determinism must not depend on in-process caches (the texture atlases are cached)."""
    args = {"width": 700, "height": 600, "mpp": 0.25, "planted_fraction": 0.3, "seed": 5, "texture_seed": 3}
    code = f"from stamp.synthetic import SlideSpec, write_slide; write_slide({str(tmp_path / 'a' / 's.svs')!r}, SlideSpec(**{args!r}))"
    subprocess.run([sys.executable, "-c", code], check=True)
    write_slide(tmp_path / "b" / "s.svs", SlideSpec(**args))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 5 and a == b


def test_rewrite_replaces_previous_cohort_and_refuses_foreign_folders(tmp_path: Path) -> None:
    out = tmp_path / "c"
    write_cohort(out, n_patients=4, seed=1, size=512, variants=False)
    (out / "run.log").write_text("kept")
    info = write_cohort(out, n_patients=2, seed=1, size=512, variants=False)
    assert len(list(info.slides_dir.glob("*.svs"))) == len(info.slides) <= 3
    assert (out / "run.log").read_text() == "kept"
    assert not [p for p in out.iterdir() if p.name.startswith(".synth-build")]
    foreign = tmp_path / "foreign"
    (foreign / "slides").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by `stamp synth`"):
        write_cohort(foreign, n_patients=2, seed=1, size=512, variants=False)
    assert (foreign / "slides").is_dir() and not list((foreign / "slides").iterdir())


def test_no_prefect_or_torch_import() -> None:
    code = "import sys, stamp.synthetic; assert not {'prefect', 'torch'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True)
