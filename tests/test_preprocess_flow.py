"""``preprocess`` end to end on a synthetic cohort through real Prefect flow runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from stamp.config_models import PreprocessingConfig
from stamp.synthetic import SlideTruth, write_cohort

pytestmark = pytest.mark.usefixtures("prefect_api")

STAMP_ATTRS = ("extractor", "unit", "tile_size_um", "tile_size_px", "feat_type", "stamp_version", "code_hash")
OUR_ATTRS = ("slide_sha256", "mpp_requested", "mpp_effective", "weights_sha256", "config_sha256", "reader")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, n_patients=4, seed=3, size=3072, variants=True)
    return root


def _cfg(wsi_dir: Path, out: Path, **extra: object) -> PreprocessingConfig:
    return PreprocessingConfig(output_dir=out, wsi_dir=wsi_dir, extractor="demo", max_workers=2, **extra)


def _run(cfg: PreprocessingConfig) -> dict:
    from stamp_flows.preprocess import run_preprocess

    return run_preprocess(cfg, task_concurrency=2)


def _by_slide(result: dict) -> dict[str, dict]:
    return {r["slide"]: r for r in result["rows"]}


def test_cohort_outputs_errors_and_truth(cohort: Path, tmp_path: Path) -> None:
    tile_um = 128.0  # small tiles, so planted regions span whole tiles
    result = _run(_cfg(cohort, tmp_path / "features", tile_size_um=tile_um))
    rows = _by_slide(result)
    slides = sorted(p.relative_to(cohort).as_posix() for p in (cohort / "slides").glob("*.svs"))
    assert all(rows[s]["status"] == "done" for s in slides)
    # each broken variant fails with its own reason; the others still finish
    assert "no tissue" in rows["extras/blank.svs"]["reason"]
    assert "default_slide_mpp" in rows["extras/generic_no_mpp.tif"]["reason"]
    assert "not a slide" in rows["extras/not_a_slide.svs"]["reason"]
    assert "truncated" in rows["extras/truncated.svs"]["reason"]
    assert "corrupt" in rows["extras/corrupt_tiles.svs"]["reason"]  # level-0 tiles unreadable
    assert result["counts"]["failed"] == 5
    feat_dir = Path(result["feature_dir"])
    assert (feat_dir / "summary.md").read_text().count("| failed |") == 5

    inside, total, planted_tiles, planted_kept = 0, 0, 0, 0
    for rel in slides:
        h5 = feat_dir / Path(rel).with_suffix(".h5")
        with h5py.File(h5) as f:
            for key in STAMP_ATTRS + OUR_ATTRS:
                assert key in f.attrs, f"{h5.name} lacks attribute {key}"
            assert (
                f.attrs["unit"] == "um" and f.attrs["feat_type"] == "tile" and f.attrs["extractor"] == "demo"
            )
            assert f["feats"].dtype == np.float16 and f["coords"].dtype == np.float32
            coords = f["coords"][()]
            mpp_eff = float(f.attrs["mpp_effective"])
        assert np.array_equal(np.lexsort((coords[:, 0], coords[:, 1])), np.arange(len(coords)))
        assert mpp_eff == pytest.approx(tile_um / 224, rel=0.01)
        assert h5.with_suffix(".jpg").exists() and h5.with_name(h5.stem + ".tissue.geojson").exists()
        truth = SlideTruth.load(cohort / rel)
        side_px = tile_um / truth.mpp
        kept = {(round(x / tile_um), round(y / tile_um)) for x, y in coords}
        for x, y in coords:
            total += 1
            inside += truth.tissue_fraction_at(x / truth.mpp, y / truth.mpp, side_px, side_px) > 0
        cols, rows_ = int(np.ceil(truth.width / side_px)), int(np.ceil(truth.height / side_px))
        for gy in range(rows_):
            for gx in range(cols):
                if truth.planted_fraction_at(gx * side_px, gy * side_px, side_px, side_px) >= 0.5:
                    planted_tiles += 1
                    planted_kept += (gx, gy) in kept
    assert inside / total >= 0.95, f"only {inside}/{total} kept tiles touch tissue"
    assert planted_tiles > 0 and planted_kept == planted_tiles, (
        f"{planted_kept}/{planted_tiles} planted tiles kept"
    )


def test_cache_second_run_reads_no_slide(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wsi = tmp_path / "wsi"
    shutil.copytree(cohort / "slides", wsi)
    cfg = _cfg(wsi, tmp_path / "features")
    first = _run(cfg)
    n = len(first["rows"])
    assert first["counts"]["done"] == n

    import stamp.hashing
    import stamp.preprocessing.extract

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("an unchanged cohort must not read any slide")

    with monkeypatch.context() as m:
        m.setattr(stamp.preprocessing.extract, "open_slide", forbidden)
        m.setattr(stamp.hashing, "file_sha256", forbidden)
        second = _run(cfg)
    assert second["counts"]["cached"] == n and second["counts"]["done"] == 0

    # a renamed slide is a cache hit, and its features appear under the new name
    moved = wsi / "sub" / "renamed.svs"
    moved.parent.mkdir()
    src = sorted(wsi.glob("*.svs"))[0]
    src.rename(moved)
    third = _by_slide(_run(cfg))
    assert third["sub/renamed.svs"]["status"] == "cached"
    assert (Path(first["feature_dir"]) / "sub" / "renamed.h5").exists()

    # a deleted output is recomputed
    other = sorted(wsi.glob("*.svs"))[0]
    victim = Path(first["feature_dir"]) / other.with_suffix(".h5").name
    victim.unlink()
    fourth = _by_slide(_run(cfg))
    assert fourth[other.name]["status"] == "done" and victim.exists()

    # a changed parameter misses
    changed = _run(_cfg(wsi, tmp_path / "features", tile_size_um=512.0))
    assert changed["counts"]["done"] == n


def test_default_slide_mpp_rescues_generic_tiff(cohort: Path, tmp_path: Path) -> None:
    wsi = tmp_path / "wsi"
    wsi.mkdir()
    shutil.copy(cohort / "extras" / "generic_no_mpp.tif", wsi)
    result = _run(_cfg(wsi, tmp_path / "features", default_slide_mpp=0.5))
    row = result["rows"][0]
    assert row["status"] == "done" and row["mpp"] == 0.5 and row["tiles_kept"] > 0


def _task_runs(prefix: str) -> list[str]:
    """Names of the task runs whose name starts with ``prefix`` on the current Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    names: list[str] = []
    with get_client(sync_client=True) as client:
        while True:  # page through: the API returns at most its default limit per call
            page = client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
                offset=len(names),
                limit=200,
            )
            names += [r.name for r in page]
            if len(page) < 200:
                return sorted(n for n in names if n.startswith(prefix))


def test_up_to_date_slides_need_no_task_run(cohort: Path, tmp_path: Path) -> None:
    """A rerun serves slides whose h5 record matches without a task run (no API round trips per slide);
    an h5 changed on disk is not served that way: its task runs and writes it again."""
    wsi = tmp_path / "wsi"
    shutil.copytree(cohort / "slides", wsi)
    cfg = _cfg(wsi, tmp_path / "features", tile_size_um=384.0)  # no other test's cache entries
    first = _run(cfg)
    n = first["counts"]["done"]
    assert n > 1
    before = _task_runs("preprocess-")
    second = _run(cfg)
    assert second["counts"]["cached"] == n and second["counts"]["done"] == 0
    assert _task_runs("preprocess-") == before, "an up-to-date slide must not start a task"
    assert {r["slide"]: r["tiles_kept"] for r in second["rows"]} == {
        r["slide"]: r["tiles_kept"] for r in first["rows"]
    }

    slide = sorted(wsi.glob("*.svs"))[0]
    victim = Path(first["feature_dir"]) / slide.with_suffix(".h5").name
    with h5py.File(victim, "r+") as f:
        original = float(f["feats"][0, 0])
        f["feats"][0, 0] = original + 1.0  # changed after it was written: its record no longer matches
    third = _by_slide(_run(cfg))
    new = _task_runs("preprocess-")
    for name in before:
        new.remove(name)
    assert new and set(new) == {f"preprocess-{slide.name}"}, "exactly the changed slide runs its task"
    assert third[slide.name]["status"] == "done"
    with h5py.File(victim, "r") as f:
        assert float(f["feats"][0, 0]) == pytest.approx(original)
