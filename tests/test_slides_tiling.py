"""Tiling: level choice, grid geometry, STAMP compatibility, ground-truth quality, robustness."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stamp.slides import (
    SlideError,
    SlideReadError,
    TilingParams,
    iter_tile_batches,
    open_slide,
    plan_tiles,
    resolve_mpp,
)
from stamp.slides.tile_reading import edge_fraction, tile_slide
from stamp.slides.tiling import choose_level, stamp_cell_tiles
from stamp.synthetic import CohortInfo, SlideSpec, SlideTruth, write_cohort, write_slide
from tests.test_slides_support import make_image, stamp_reference_tiles, write_aperio, write_stripped

FINE = TilingParams(tile_size_um=128.0, tile_size_px=112, max_workers=2)  # same 1.14 µm/px, more tiles
ON_TISSUE = 0.05  # a kept tile "lies inside tissue" when ≥ 5 % of its area is tissue (ground truth)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortInfo:
    return write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=3, size=4096, seed=0, variants=True)


@pytest.fixture(scope="module")
def slide025(tmp_path_factory: pytest.TempPathFactory) -> SlideTruth:
    d = tmp_path_factory.mktemp("s025")
    return write_slide(
        d / "s.svs", SlideSpec(width=4096, height=4096, mpp=0.25, planted_fraction=0.3, seed=1)
    )


def _kept_grid(plan, coords: np.ndarray) -> np.ndarray:
    kept = np.zeros(plan.grid, bool)
    idx = np.round(coords / plan.tile_size_um).astype(int)
    kept[idx[:, 1], idx[:, 0]] = True
    assert kept.sum() == len(coords), "duplicate tiles"
    return kept


def _truth_grid(truth: SlideTruth, plan, planted: bool = False) -> np.ndarray:
    f = truth.planted_fraction_at if planted else truth.tissue_fraction_at
    s = plan.tile_px0
    return np.array([[f(c * s, r * s, s, s) for c in range(plan.grid[1])] for r in range(plan.grid[0])])


# --------------------------------------------------------------------------- parameters / level choice


def test_params_validation() -> None:
    assert TilingParams().mpp_requested == pytest.approx(256 / 224)
    for bad in (
        {"tile_size_um": 0},
        {"tile_size_px": 0},
        {"brightness_cutoff": 255},
        {"canny_cutoff": 1.5},
        {"tissue_method": "magic"},
        {"min_tissue_fraction": 2},
        {"max_workers": 0},
        {"supertile_tiles": 0},
    ):
        with pytest.raises(ValueError):
            TilingParams(**bad)


def test_level_choice_reads_16x_fewer_pixels(tmp_path: Path) -> None:
    """0.25 µm/px slide, target 1.14 µm/px: level 1 (÷4) is read, 16× fewer pixels than level 0."""
    path = write_aperio(tmp_path / "s.svs", make_image(4096, 4096), mpp=0.25, downsamples=(1, 4, 16))
    params = TilingParams(brightness_cutoff=None, canny_cutoff=None, max_workers=2)
    with open_slide(path) as r:
        assert choose_level(r, 0.25, params.mpp_requested) == 1
        tiles_auto, coords_auto, plan_auto, stats_auto = tile_slide(r, 0.25, params)
        level0 = TilingParams(brightness_cutoff=None, canny_cutoff=None, max_workers=2, read_level=0)
        tiles_l0, coords_l0, plan_l0, stats_l0 = tile_slide(r, 0.25, level0)
    assert plan_auto.level == 1 and plan_auto.level_mpp == pytest.approx(1.0)
    assert plan_l0.level == 0
    np.testing.assert_array_equal(coords_auto, coords_l0)
    ratio = stats_l0.pixels_read / stats_auto.pixels_read
    assert 15.0 <= ratio <= 17.0, ratio
    # same content either way (pyramid level vs level-0 downscale)
    assert np.abs(tiles_auto.astype(int) - tiles_l0.astype(int)).mean() < 4
    assert plan_auto.mpp_effective == pytest.approx(256 / 224, rel=1e-3)


def test_level_choice_rules(tmp_path: Path) -> None:
    path = write_aperio(tmp_path / "s.svs", make_image(2048, 2048), mpp=0.25, downsamples=(1, 4, 16))
    with open_slide(path) as r:
        assert choose_level(r, 0.25, 0.5) == 0  # level 1 = 1.0 µm/px is coarser than 0.5
        assert choose_level(r, 0.25, 4.0) == 2
        assert choose_level(r, 0.25, 3.98) == 2  # within 1 % tolerance
        assert choose_level(r, 0.25, 3.9) == 1
        assert choose_level(r, 0.25, 0.1) == 0  # finer than the slide: level 0 (upsampled)


def test_upsampled_slide_reports_coarser_mpp_effective(tmp_path: Path) -> None:
    path = write_stripped(tmp_path / "coarse.tif", make_image(600, 400), mpp=2.0)
    with open_slide(path) as r:
        mpp, _ = resolve_mpp(r)
        plan = plan_tiles(r, mpp, TilingParams(brightness_cutoff=None, canny_cutoff=None))
    assert plan.upsampled and plan.mpp_effective == pytest.approx(2.0)
    assert plan.tile_px0 == pytest.approx(128.0)


# --------------------------------------------------------------------------- grid geometry


def test_grid_coordinates_exact_for_non_integer_side(tmp_path: Path) -> None:
    """mpp 0.3: tile side 853.3 level-0 px, yet µm coordinates are exact multiples of 256."""
    path = write_aperio(tmp_path / "s.svs", make_image(3000, 2000), mpp=0.3, downsamples=(1, 4))
    params = TilingParams(brightness_cutoff=None, canny_cutoff=None, max_workers=2)
    with open_slide(path) as r:
        tiles, coords, plan, stats = tile_slide(r, 0.3, params)
    assert plan.grid == (math.ceil(2000 * 0.3 / 256), math.ceil(3000 * 0.3 / 256))
    assert len(coords) == plan.n_tiles == stats.kept == stats.tiles_total
    assert coords.dtype == np.float32 and tiles.shape[1:] == (224, 224, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(coords % 256, 0)
    assert (coords[:, 0] / 0.3 < 3000).all() and (coords[:, 1] / 0.3 < 2000).all()
    # edge tiles extend past the slide and are padded white
    last_col = tiles[coords[:, 0] == coords[:, 0].max()]
    assert (last_col[:, :, -20:] == 255).all()


@pytest.mark.parametrize(
    ("width", "height", "mpp", "tile_um", "tile_px"),
    [(4096, 4096, 0.25, 256.0, 224), (3500, 3000, 0.5, 256.0, 224), (3000, 3000, 0.25, 64.0, 56)],
)
def test_stamp_compatible_tile_set(
    tmp_path: Path, width: int, height: int, mpp: float, tile_um: float, tile_px: int
) -> None:
    """Same grid, coordinates and brightness decisions as a level-0 re-statement of STAMP's rule."""
    truth = write_slide(
        tmp_path / "s.svs", SlideSpec(width=width, height=height, mpp=mpp, planted_fraction=0.2, seed=5)
    )
    inside = lambda k: k[0] < width * mpp and k[1] < height * mpp  # noqa: E731
    with open_slide(truth.slide_path) as r:
        # grid only: every tile, STAMP's coordinates (integer tile side here: 1024 / 512 / 256 px)
        ref = stamp_reference_tiles(truth.slide_path, mpp, tile_um, tile_px, None, None)
        _, coords, plan, _ = tile_slide(r, mpp, TilingParams(tile_um, tile_px, None, None, max_workers=2))
        ours = {tuple(map(float, c)) for c in coords}
        assert ours == {k for k in ref if inside(k)}
        # STAMP also lists tiles that start beyond the slide inside partial supertiles; we don't
        assert all(not inside(k) for k in set(ref) - ours)
        assert plan.cell_tiles == stamp_cell_tiles(mpp, tile_um)

        # brightness stage: identical cells; Canny stage: equal up to resampling
        params = TilingParams(tile_um, tile_px, max_workers=2)
        ref = stamp_reference_tiles(truth.slide_path, mpp, tile_um, tile_px, 240, 0.02)
        _, coords, plan, _ = tile_slide(r, mpp, params)
    candidates = {tuple(map(float, c)) for c in plan.candidate_coords_um()}
    assert candidates == {k for k in ref if inside(k)}
    ours = {tuple(map(float, c)) for c in coords}
    theirs = {k for k, kept in ref.items() if kept}
    jaccard = len(ours & theirs) / len(ours | theirs)
    assert jaccard >= 0.9, (len(ours), len(theirs), jaccard)


def test_canny_matches_stamp_rule() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((224, 224, 3), 200, np.uint8)
    busy = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    assert edge_fraction(flat) == 0.0
    assert edge_fraction(busy) > 0.02


# --------------------------------------------------------------------------- ground truth (synthetic cohort)


@pytest.mark.parametrize("method", ["stamp", "otsu"])
@pytest.mark.parametrize("params", [TilingParams(max_workers=2), FINE], ids=["256um", "128um"])
def test_cohort_tiles_on_tissue(cohort: CohortInfo, method: str, params: TilingParams) -> None:
    """≥ 95 % of kept tiles on tissue, ≥ 90 % of tissue covered, every planted tile (≥ 50 %) kept."""
    params = TilingParams(**{**params.__dict__, "tissue_method": method})
    fractions, tissue_total, tissue_covered = [], 0.0, 0.0
    n_planted = 0
    for rec in cohort.slides:
        truth = rec.truth
        with open_slide(truth.slide_path) as r:
            mpp, _ = resolve_mpp(r)
            _, coords, plan, stats = tile_slide(r, mpp, params)
        assert stats.complete and stats.kept == len(coords)
        kept = _kept_grid(plan, coords)
        tissue = _truth_grid(truth, plan)
        planted = _truth_grid(truth, plan, planted=True)
        fractions.append(tissue[kept])
        tissue_total += tissue.sum()
        tissue_covered += (tissue * kept).sum()
        missed = (planted >= 0.5) & ~kept
        assert not missed.any(), f"{truth.slide_path.name}: planted tiles not kept at {np.argwhere(missed)}"
        n_planted += int((planted >= 0.5).sum())
    fr = np.concatenate(fractions)
    assert (fr >= ON_TISSUE).mean() >= 0.95
    assert tissue_covered / tissue_total >= 0.90
    assert n_planted > 0


@pytest.mark.parametrize("method", ["stamp", "otsu"])
def test_blank_slide_keeps_nothing(cohort: CohortInfo, method: str) -> None:
    blank = cohort.extras["blank"]
    assert isinstance(blank, SlideTruth)
    with open_slide(blank.slide_path) as r:
        params = TilingParams(tissue_method=method, max_workers=2)
        plan = plan_tiles(r, 0.5, params)
        it = iter_tile_batches(r, plan, params)
        assert list(it) == []
    assert it.stats.kept == 0 and it.stats.complete
    assert it.stats.no_tissue_reason().startswith("no tissue found: 0 of")


def test_deterministic_across_runs_and_workers(slide025: SlideTruth) -> None:
    results = []
    with open_slide(slide025.slide_path) as r:
        for workers in (1, 2, 8, 2):
            tiles, coords, _, stats = tile_slide(
                r, 0.25, TilingParams(tile_size_um=64.0, tile_size_px=56, max_workers=workers)
            )
            results.append((tiles, coords, stats.kept))
    for tiles, coords, kept in results[1:]:
        np.testing.assert_array_equal(coords, results[0][1])
        np.testing.assert_array_equal(tiles, results[0][0])
        assert kept == results[0][2] > 0


def test_batches_bounded_and_closable(slide025: SlideTruth) -> None:
    params = TilingParams(tile_size_um=64.0, tile_size_px=56, max_workers=2, supertile_tiles=2)
    with open_slide(slide025.slide_path) as r:
        plan = plan_tiles(r, 0.25, params)
        assert len(plan.groups) > 4
        before = threading.active_count()
        it = iter_tile_batches(r, plan, params)
        first = next(it)
        assert first.tiles.shape[1:] == (56, 56, 3) and first.coords_um.shape == (len(first), 2)
        assert threading.active_count() <= before + params.max_workers
        it.close()
        time.sleep(0.05)
        assert not it.stats.complete
        assert threading.active_count() <= before
        with pytest.raises(StopIteration):
            next(it)


def test_stats_add_up(slide025: SlideTruth) -> None:
    with open_slide(slide025.slide_path) as r:
        _, coords, plan, stats = tile_slide(r, 0.25, FINE)
    assert stats.tiles_total == plan.n_tiles
    assert stats.rejected_background + stats.rejected_canny + stats.kept == stats.tiles_total
    assert stats.kept == len(coords) > 0 and stats.seconds > 0
    assert "tiles kept" in stats.summary()
    d = plan.describe()
    assert d["read_level"] == 1 and d["mpp_requested"] == pytest.approx(128 / 112)
    assert d["slide_reader"] == "openslide"


# --------------------------------------------------------------------------- broken slides


def _outcome(path: Path, default_mpp: float | None = None, **kw) -> str:
    """What the per-slide pipeline would record: 'ok' or the one-line reason."""
    params = TilingParams(max_workers=2, **kw)
    try:
        with open_slide(path) as r:
            mpp, _ = resolve_mpp(r, default_mpp)
            plan = plan_tiles(r, mpp, params)
            it = iter_tile_batches(r, plan, params)
            n = sum(len(b) for b in it)
            return "ok" if n else it.stats.no_tissue_reason()
    except SlideError as e:
        assert "\n" not in e.reason
        return e.reason


def test_broken_slides_get_clear_reasons(cohort: CohortInfo) -> None:
    ex = cohort.extras
    path = lambda v: v.slide_path if isinstance(v, SlideTruth) else v  # noqa: E731
    assert _outcome(path(ex["truncated"])).startswith("truncated/corrupt")
    assert _outcome(path(ex["not_a_slide"])) == "not a slide OpenSlide or tifffile can read"
    assert _outcome(path(ex["blank"])).startswith("no tissue found")
    no_mpp = _outcome(path(ex["generic_no_mpp"]))
    assert "default_slide_mpp" in no_mpp and "microns-per-pixel" in no_mpp
    assert _outcome(path(ex["generic_no_mpp"]), default_mpp=0.5) == "ok"


def test_corrupt_level0_tiles(cohort: CohortInfo) -> None:
    """Zeroed level-0 tiles: unseen when level 1 suffices; a clear error when level 0 is read."""
    corrupt = cohort.extras["corrupt_tiles"]
    assert isinstance(corrupt, SlideTruth)
    assert _outcome(corrupt.slide_path) == "ok"  # 0.25 µm/px → reads level 1, which is intact
    reason = _outcome(corrupt.slide_path, read_level=0)
    assert reason.startswith("truncated/corrupt"), reason
    with (
        open_slide(corrupt.slide_path, reader="tifffile") as r,
        pytest.raises(SlideReadError, match="truncated/corrupt"),
    ):
        tile_slide(r, 0.25, TilingParams(read_level=0, max_workers=2))
