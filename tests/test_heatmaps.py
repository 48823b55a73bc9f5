"""Heatmaps on a small synthetic slide with hand-made tile features and hand-built checkpoints (fast tier).

The features of each tile are its planted fraction (dim 0) plus noise, so a hand-built linear
model "knows" the biomarker and its relevance must point at the planted regions. The tile size
is 100 µm (not STAMP's hard-coded 256 µm) and the slide is at 0.5 µm/px.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stamp.config_models import HeatmapsConfig
from stamp.features import write_tile_features
from stamp.heatmaps import (
    HeatmapError,
    HeatmapJob,
    SlideHeatmaps,
    localisation_score,
    plan_heatmaps,
    render_slide,
)
from stamp.heatmaps.loading import cached_model
from stamp.heatmaps.relevance import gradient_x_input, single_tile_logits
from stamp.modeling.checkpoint import save_checkpoint
from stamp.modeling.models.registry import build_model
from stamp.slides import open_slide
from stamp.synthetic import SlideSpec, SlideTruth, write_slide

# tiny models on 2 shared cores: one intra-op thread is ~10x faster than spinning two
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MPP, TILE_UM, DIM = 0.5, 100.0, 8
TILE_PX0 = round(TILE_UM / MPP)  # 200 level-0 px
W, H = 1600, 1200  # level-0 px → 800 x 600 µm → 8 x 6 tiles
CLASSES = ["MSIH", "nonMSIH"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SlideTruth]:
    root = tmp_path_factory.mktemp("hm")
    truth = write_slide(
        root / "wsi" / "site" / "slideA.svs",
        SlideSpec(width=W, height=H, mpp=MPP, planted_fraction=0.35, seed=4),
    )
    return root, truth


def _grid_features(truth: SlideTruth, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles on tissue, their coords (µm) and features (dim 0 = planted fraction)."""
    rng = np.random.default_rng(seed)
    coords, planted = [], []
    for r in range(math.ceil(H / TILE_PX0)):
        for c in range(math.ceil(W / TILE_PX0)):
            x, y = c * TILE_PX0, r * TILE_PX0
            if truth.tissue_fraction_at(x, y, TILE_PX0, TILE_PX0) > 0.1:
                coords.append((c * TILE_UM, r * TILE_UM))
                planted.append(truth.planted_fraction_at(x, y, TILE_PX0, TILE_PX0))
    coords_a, planted_a = np.array(coords, np.float32), np.array(planted, np.float32)
    feats = rng.normal(0, 0.05, size=(len(coords_a), DIM)).astype(np.float32)
    feats[:, 0] = planted_a * 3.0
    feats[:, 1] += 1.0
    return coords_a, feats, planted_a


def _h5(path: Path, coords: np.ndarray, feats: np.ndarray, **kw: Any) -> Path:
    args: dict[str, Any] = {
        "extractor": "demo",
        "tile_size_um": TILE_UM,
        "tile_size_px": 224,
        "code_hash": "abcd1234",
    }
    args.update(kw)
    return write_tile_features(path, feats, coords, **args)


def _linear_ckpt(
    path: Path, task: str = "classification", *, level: str = "tile", sign: float = 1.0, **meta: Any
) -> Path:
    n_out = 2 if task == "classification" else 1
    model = build_model("linear", dim_input=DIM, n_outputs=n_out)
    with torch.no_grad():
        model.net.weight.zero_()
        model.net.bias.zero_()
        model.net.weight[0, 0] = 2.0 * sign
        if n_out == 2:
            model.net.weight[1, 0] = -2.0 * sign
    base: dict[str, Any] = {
        "task": task, "model_name": "linear", "model_params": {}, "dim_input": DIM, "n_outputs": n_out,
        "feature_type": level, "extractor": "demo",
        "targets": ["isMSIH"] if task == "classification" else (["TMB"] if task == "regression" else ["OS_time", "OS_event"]),
        "ground_truth_label": "isMSIH" if task == "classification" else ("TMB" if task == "regression" else None),
        "categories": {"isMSIH": CLASSES} if task == "classification" else {},
    }  # fmt: skip
    base.update(meta)
    return save_checkpoint(path, model, base)


@pytest.fixture(scope="module")
def rendered(slide: tuple[Path, SlideTruth]) -> tuple[SlideHeatmaps, HeatmapJob, np.ndarray, np.ndarray]:
    root, truth = slide
    coords, feats, planted = _grid_features(truth)
    h5 = _h5(root / "features" / "site" / "slideA.h5", coords, feats)
    ckpt = _linear_ckpt(root / "cls.ckpt")
    sec = HeatmapsConfig(
        output_dir=root / "out", feature_dir=root / "features", wsi_dir=root / "wsi", checkpoint_path=ckpt
    )
    plan = plan_heatmaps(sec)
    assert [j.name for j in plan] == ["site/slideA"] and plan[0].feature_path == h5 and not plan.skipped
    result = render_slide(plan[0], ckpt, opacity=0.6, topk=3, bottomk=2, device="cpu")
    return result, plan[0], coords, planted


def test_files_have_stamp_names_and_pngs_their_size(rendered: Any) -> None:
    result, job, coords, _ = rendered
    out = job.output_dir
    assert out == job.output_dir.parent / "slideA" and out.parent.name == "site"
    p = result.slide_scores["MSIH"]
    assert result.predicted == "MSIH" and p > 0.5
    expected = [
        "plots/overview-slideA.png", "plots/overlay-slideA-MSIH.png", "plots/overlay-slideA-nonMSIH.png",
        "raw/thumbnail-slideA.png", "raw/slideA-classmap.png", f"raw/slideA-MSIH={p:.2f}.png",
        f"raw/slideA-nonMSIH={1 - p:.2f}.png", "raw/raw-overlay-slideA-MSIH.png", "raw/raw-overlay-slideA-nonMSIH.png",
        "raw/slideA-arrays.npz", "slideA-tiles.geojson",
    ]  # fmt: skip
    for rel in expected:
        assert (out / rel).is_file(), rel
    assert set(result.files) == {p for p in out.rglob("*") if p.is_file() and p.name != ".provenance.json"}
    assert (out / ".provenance.json").is_file(), "the folder carries its provenance record"
    assert not list(out.parent.glob(".slideA*")), "no temp folder may be left"
    tops = sorted(f.name for f in (out / "tiles").glob("top_*"))
    bottoms = sorted(f.name for f in (out / "tiles").glob("bottom_*"))
    assert [t[:6] for t in tops] == ["top_01", "top_02", "top_03"] and len(bottoms) == 2
    assert all(t.startswith(("top_0", "bottom_0")) and "-slideA-MSIH=" in t for t in tops + bottoms)
    # thumbnail scale: 8 px per 100 µm tile (STAMP would use 8 px per 256 µm)
    size = (math.ceil(W * MPP * 8 / TILE_UM), math.ceil(H * MPP * 8 / TILE_UM))
    assert size == (64, 48)
    for rel in ("raw/thumbnail-slideA.png", "raw/slideA-classmap.png", f"raw/slideA-MSIH={p:.2f}.png",
                "raw/raw-overlay-slideA-MSIH.png"):  # fmt: skip
        with Image.open(out / rel) as im:
            assert im.size == size, rel
            arr = np.asarray(im.convert("RGBA"))
        assert arr[..., :3].std() > 5, f"{rel} is blank"
    with Image.open(out / f"raw/slideA-MSIH={p:.2f}.png") as im:
        alpha = np.asarray(im)[..., 3]
    assert (alpha > 0).sum() == len(coords) * 64  # every tile paints 8 x 8 px
    with Image.open(result.overview) as im:
        assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 5
    assert (
        result.thumbnail == out / "raw/thumbnail-slideA.png"
        and result.overview == out / "plots/overview-slideA.png"
    )


def test_top_tiles_are_read_at_their_location_and_size(rendered: Any, slide: Any) -> None:
    result, job, coords, planted = rendered
    top = result.top["MSIH"]
    assert len(top) >= 5 and [t.rank for t in top[:3]] == [1, 2, 3]
    assert all(t.file for t in top[:3]) and not any(t.file for t in top[3:])
    assert [t.score for t in top] == sorted((t.score for t in top), reverse=True)
    best = int(np.argmax(planted))
    assert (top[0].x_um, top[0].y_um) == tuple(float(v) for v in coords[best])  # the most planted tile
    with open_slide(job.slide_path) as reader:
        for t in top[:3]:
            with Image.open(t.file) as im:
                assert im.size == (TILE_PX0, TILE_PX0)
                jpg = np.asarray(im.convert("RGB")).astype(np.float32)
            assert (t.x_px, t.y_px) == (round(t.x_um / MPP), round(t.y_um / MPP))
            direct = reader.read_region(t.x_px, t.y_px, 0, TILE_PX0, TILE_PX0).astype(np.float32)
            assert np.abs(jpg - direct).mean() < 4.0, "the tile JPEG must show the slide at the tile's place"
            shifted = reader.read_region(t.x_px + TILE_PX0 // 2, t.y_px, 0, TILE_PX0, TILE_PX0)
            assert np.abs(jpg - shifted).mean() > np.abs(jpg - direct).mean()


def test_geojson_has_one_tile_feature_per_tile_with_measurements(rendered: Any) -> None:
    result, _, coords, _ = rendered
    geo = json.loads(result.geojson.read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    keys = {"relevance MSIH", "relevance nonMSIH", "score MSIH", "p MSIH", "p nonMSIH"}
    for f, (x, y) in zip(geo["features"], coords, strict=True):
        props = f["properties"]
        assert props["objectType"] == "tile" and keys <= set(props["measurements"])
        assert all(isinstance(v, float) for v in props["measurements"].values())
        assert props["classification"]["name"] in CLASSES
        ring = np.array(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and ring.shape == (5, 2)
        np.testing.assert_allclose(ring[0], [x / MPP, y / MPP])
        np.testing.assert_allclose(ring[2] - ring[0], [TILE_PX0, TILE_PX0])


def test_localisation_score_against_the_generator_truth(rendered: Any, slide: Any, tmp_path: Path) -> None:
    result, job, _, planted = rendered
    _, truth = slide
    best5 = np.sort(planted)[::-1][:5]  # the model ranks tiles by planted fraction
    assert localisation_score(result, truth, k=5, positive="MSIH") == pytest.approx((best5 >= 0.5).mean())
    assert localisation_score(result, truth, k=3, positive="MSIH") == 1.0
    assert localisation_score([result], {job.slide_path: truth}, k=3, positive="MSIH", by="score") == 1.0
    with pytest.raises(ValueError, match="1 results but 2 truths"):
        localisation_score([result], [truth, truth])
    # a model that looks at the wrong feature does not localise
    wrong = _linear_ckpt(tmp_path / "wrong.ckpt")
    state = torch.load(wrong, weights_only=True)
    state["state_dict"]["net.weight"] = torch.zeros(2, DIM)
    state["state_dict"]["net.weight"][0, 1] = 2.0
    torch.save(state, wrong)
    job2 = HeatmapJob(job.slide_path, job.feature_path, tmp_path / "wrong" / "slideA", job.name)
    bad = render_slide(job2, wrong, device="cpu")
    assert localisation_score(bad, truth, k=5, positive="MSIH") < 0.8


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_chunked_relevance_equals_unchunked_and_stamps_jacrev() -> None:
    torch.manual_seed(0)
    model = build_model(
        "vit",
        dim_input=DIM,
        n_outputs=3,
        params={"dim_model": 16, "dim_feedforward": 16, "n_heads": 2, "n_layers": 2},
    )
    model.eval()
    x, xy = torch.randn(37, DIM), torch.rand(37, 2) * 1000
    for steps in (1, 3):
        full, signed, logits = gradient_x_input(model, x, xy, steps=steps, chunk=None)
        chunked, _, _ = gradient_x_input(model, x, xy, steps=steps, chunk=5)
        np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.abs(signed), full)
        assert full.shape == (37, 3) and logits.shape == (3,)
    # steps=1 is STAMP's jacrev formula: |mean_d(x ⊙ ∂logits/∂x)|
    jac = torch.func.jacrev(lambda b: model(b.unsqueeze(0), xy.unsqueeze(0), None).squeeze(0))(x)  # (C, N, D)
    stamp = (x * jac).mean(-1).abs().T.detach().numpy()
    full, _, _ = gradient_x_input(model, x, xy, steps=1, chunk=4)
    np.testing.assert_allclose(full, stamp, rtol=1e-4, atol=1e-7)
    a = single_tile_logits(model, x, xy, chunk=4)
    b = single_tile_logits(model, x, xy, chunk=None)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b[5], model(x[5:6].unsqueeze(0), xy[5:6].unsqueeze(0), None)[0])


@pytest.mark.parametrize("task", ["regression", "survival"])
def test_regression_and_survival_have_one_map_and_top_tiles_by_relevance(
    task: str, slide: Any, tmp_path: Path
) -> None:
    root, truth = slide
    coords, feats, planted = _grid_features(truth, seed=1)
    h5 = _h5(tmp_path / "f.h5", coords, feats)
    meta = {"target_mean": 10.0, "target_std": 2.0} if task == "regression" else {"survival_cut_off": 0.5}
    ckpt = _linear_ckpt(tmp_path / "m.ckpt", task, **meta)
    job = HeatmapJob(truth.slide_path, h5, tmp_path / "out" / "slideA", "slideA")
    res = render_slide(job, ckpt, topk=2, bottomk=1, device="cpu")
    out = job.output_dir
    for rel in ("raw/slideA-heatmap.png", "raw/thumbnail-slideA.png", "raw/raw-overlay-slideA.png",
                "plots/overlay-slideA.png", "plots/overview-slideA.png"):  # fmt: skip
        assert (out / rel).is_file(), rel
    label = "TMB" if task == "regression" else "risk"
    assert res.labels == [label] and res.predicted is None
    tops = sorted(p.name for p in (out / "tiles").iterdir())
    assert (
        len(tops) == 3 and tops[0].startswith(f"bottom_01-slideA-{label}=") and tops[1].startswith("top_01")
    )
    rel = [t.relevance for t in res.top[label]]
    assert rel == sorted(rel, reverse=True) and res.top[label][0].score == 1.0  # min-max relevance
    with np.load(res.arrays) as z:
        assert int(np.argmax(z["relevance"][:, 0])) == int(np.argmax(planted))
        if task == "regression":  # predictions in target units: mean + std * logit
            x = torch.tensor(feats).mean(0)
            assert res.slide_scores["TMB"] == pytest.approx(10.0 + 2.0 * 2.0 * float(x[0]), rel=1e-4)
    with Image.open(out / "raw/slideA-heatmap.png") as im:
        px = np.asarray(im)
    import matplotlib

    idx = int(np.argmax(planted))
    cx, cy = (int(v) for v in np.rint(coords[idx] * 8 / TILE_UM) + 3)
    if task == "regression":  # magma at relevance 1
        np.testing.assert_array_equal(px[cy, cx, :3], matplotlib.colormaps["magma"](1.0, bytes=True)[:3])
    else:  # RdBu_r centred at the median risk: the top tile is red (above the cut-off), not blue
        assert px[cy, cx, 0] > px[cy, cx, 2]


def test_slide_level_model_gets_per_tile_shares_of_the_mean(slide: Any, tmp_path: Path) -> None:
    root, truth = slide
    coords, feats, planted = _grid_features(truth, seed=2)
    h5 = _h5(tmp_path / "f.h5", coords, feats)
    ckpt = _linear_ckpt(tmp_path / "slide.ckpt", level="slide", extractor="titan")
    job = HeatmapJob(truth.slide_path, h5, tmp_path / "out" / "slideA", "slideA")
    res = render_slide(job, ckpt, device="cpu", ig_steps=1)
    assert "mean tile embedding" in res.note
    with np.load(res.arrays) as z:
        raw = z["relevance_raw"]
    # linear on the mean: tile i's share of logit c is w_c · x_i / N, reduced as mean over dims
    expected = np.abs(feats[:, 0] * 2.0 / len(feats) / DIM)
    np.testing.assert_allclose(raw[:, 0], expected, rtol=1e-3)
    # an embedding model whose input dim the tile features do not have: one clear line
    small = _h5(tmp_path / "small.h5", coords, feats[:, :4])
    with pytest.raises(
        HeatmapError, match=r"slideA.svs: the model takes slide-level embeddings of 8 dims.*has 4"
    ) as e:
        render_slide(
            HeatmapJob(truth.slide_path, small, tmp_path / "o2" / "slideA", "slideA"), ckpt, device="cpu"
        )
    assert "\n" not in str(e.value) and not (tmp_path / "o2").exists()


def test_bad_slides_fail_alone_with_one_line(slide: Any, tmp_path: Path) -> None:
    root, truth = slide
    coords, feats, _ = _grid_features(truth)
    good_h5 = _h5(tmp_path / "good.h5", coords, feats)
    ckpt = _linear_ckpt(tmp_path / "m.ckpt")
    not_a_slide = tmp_path / "broken.svs"
    not_a_slide.write_text("no slide here")
    cases = [
        (HeatmapJob(not_a_slide, good_h5, tmp_path / "o" / "broken", "broken"), r"broken.svs: not a slide"),
        (HeatmapJob(truth.slide_path, _h5(tmp_path / "d.h5", coords, feats[:, :5]), tmp_path / "o" / "d", "d"),
         r"slideA.svs: .*d.h5 has 5-dim features but the model takes 8"),
        (HeatmapJob(truth.slide_path, _h5(tmp_path / "e.h5", coords, feats, extractor="uni"), tmp_path / "o" / "e", "e"),
         r"comes from extractor uni but the model was trained on demo"),
        (HeatmapJob(truth.slide_path, _h5(tmp_path / "far.h5", coords + 5000, feats), tmp_path / "o" / "far", "far"),
         r"features belong to another slide"),
    ]  # fmt: skip
    for job, pattern in cases:
        with pytest.raises(HeatmapError, match=pattern) as e:
            render_slide(job, ckpt, device="cpu")
        assert "\n" not in str(e.value) and not job.output_dir.exists()
    with pytest.raises(HeatmapError, match="checkpoint not found"):
        render_slide(cases[1][0], tmp_path / "missing.ckpt", device="cpu")
    good = render_slide(
        HeatmapJob(truth.slide_path, good_h5, tmp_path / "o" / "slideA", "slideA"), ckpt, device="cpu"
    )
    assert good.overview.is_file()
    # rendering again replaces the folder in one go
    again = render_slide(
        HeatmapJob(truth.slide_path, good_h5, tmp_path / "o" / "slideA", "slideA"), ckpt, device="cpu"
    )
    assert sorted(again.files) == sorted(good.files) and sorted(
        p.name for p in (tmp_path / "o").iterdir()
    ) == ["slideA"]


def test_plan_matches_features_by_relative_path(tmp_path: Path) -> None:
    wsi, feat = tmp_path / "wsi", tmp_path / "feat"
    for rel in ("a/x.svs", "b/x.svs", "c/y.svs", "z.svs"):
        (wsi / rel).parent.mkdir(parents=True, exist_ok=True)
        (wsi / rel).write_bytes(b"slide")
    for rel in ("a/x.h5", "x.h5", "y.h5", "z.h5"):  # flat x.h5 is ambiguous (two x slides); flat y.h5 is not
        (feat / rel).parent.mkdir(parents=True, exist_ok=True)
        (feat / rel).write_bytes(b"h5")
    sec = HeatmapsConfig(
        output_dir=tmp_path / "out", feature_dir=feat, wsi_dir=wsi, checkpoint_path=tmp_path / "m.ckpt"
    )
    plan = plan_heatmaps(sec)
    jobs = {j.name: j for j in plan}
    assert set(jobs) == {"a/x", "c/y", "z"}
    assert jobs["a/x"].feature_path == feat / "a/x.h5" and jobs["a/x"].output_dir == tmp_path / "out/a/x"
    assert jobs["c/y"].feature_path == feat / "y.h5" and jobs["z"].output_dir == tmp_path / "out/z"
    assert [
        (s.slide_path.relative_to(wsi).as_posix(), "no features at" in s.reason) for s in plan.skipped
    ] == [("b/x.svs", True)]
    listed = sec.model_copy(update={"slide_paths": [Path("z.svs"), Path("gone.svs")]})
    plan = plan_heatmaps(listed)
    assert [j.name for j in plan] == ["z"] and "slide file not found" in plan.skipped[0].reason
    with pytest.raises(FileNotFoundError, match="feature_dir"):
        plan_heatmaps(sec.model_copy(update={"feature_dir": tmp_path / "nope"}))


def test_model_is_loaded_once_per_checkpoint_version(tmp_path: Path) -> None:
    ckpt = _linear_ckpt(tmp_path / "m.ckpt")
    a = cached_model(ckpt, "cpu")
    assert cached_model(ckpt, "cpu")[0] is a[0]
    shutil.copy(ckpt, tmp_path / "tmp.ckpt")
    _linear_ckpt(tmp_path / "m.ckpt", sign=-1.0)  # rewritten: new mtime → reloaded
    b = cached_model(ckpt, "cpu")
    assert b[0] is not a[0] and float(b[0].net.weight[0, 0]) == -2.0
    assert not any(p.requires_grad for p in b[0].parameters())


def test_mpp_comes_from_the_features_or_the_config_when_the_slide_has_none(tmp_path: Path) -> None:
    truth = write_slide(
        tmp_path / "nompp.tif", SlideSpec(width=800, height=600, mpp=None, vendor="generic", seed=2)
    )
    coords = np.array([[x * TILE_UM, y * TILE_UM] for y in range(3) for x in range(4)], np.float32)
    feats = np.random.default_rng(0).normal(size=(len(coords), DIM)).astype(np.float32)
    ckpt = _linear_ckpt(tmp_path / "m.ckpt")
    bare = HeatmapJob(
        truth.slide_path, _h5(tmp_path / "bare.h5", coords, feats), tmp_path / "o1" / "nompp", "nompp"
    )
    with pytest.raises(
        HeatmapError, match=r"nompp.tif: no microns-per-pixel .* set heatmaps.default_slide_mpp"
    ):
        render_slide(bare, ckpt, device="cpu")
    res = render_slide(bare, ckpt, device="cpu", default_slide_mpp=MPP)
    assert res.mpp == MPP and res.extra["mpp_source"] == "default_slide_mpp"
    recorded = _h5(tmp_path / "rec.h5", coords, feats, extra_attrs={"slide_mpp": MPP})
    res = render_slide(
        HeatmapJob(truth.slide_path, recorded, tmp_path / "o2" / "nompp", "nompp"), ckpt, device="cpu"
    )
    assert res.mpp == MPP and res.extra["mpp_source"] == "h5 slide_mpp" and res.extra["map_size"] == [32, 24]


def test_heatmap_error_is_one_line_and_survives_pickling() -> None:
    import pickle

    err = HeatmapError("/x/slide.svs", "bad\nthing   here")
    assert str(err) == "/x/slide.svs: bad thing here"
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, HeatmapError) and str(again) == str(err) and again.slide == "/x/slide.svs"


def test_map_geometry_scales_with_the_tile_size_and_caps_huge_slides() -> None:
    from stamp.heatmaps.maps import MAX_SIDE, MapGeometry

    # 40,000 x 30,000 px at 0.25 µm/px = 10 x 7.5 mm
    g256 = MapGeometry.for_slide((40_000, 30_000), 0.25, 256.0)
    g100 = MapGeometry.for_slide((40_000, 30_000), 0.25, 100.0)
    assert (g256.width, g256.height) == (math.ceil(10_000 * 8 / 256), math.ceil(7_500 * 8 / 256))
    assert (g100.width, g100.height) == (800, 600) and g100.px_per_tile == 8
    huge = MapGeometry.for_slide((200_000, 100_000), 0.25, 32.0)  # 1,562 tiles across
    assert huge.width <= MAX_SIDE and huge.px_per_tile == 2
    idx = g100.tile_index(np.array([[0.0, 0.0], [100.0, 200.0]], np.float32))
    assert (idx == 0).sum() == 64 and idx[16:24, 8:16].min() == 1 and (idx == -1).sum() == 800 * 600 - 128


def test_head_describes_every_task() -> None:
    from stamp.heatmaps.relevance import Head

    multi = Head.from_meta({"task": "classification", "targets": ["a", "b"],
                            "categories": {"a": ["x", "y"], "b": ["u", "v", "w"]}})  # fmt: skip
    assert multi.labels == ("a_x", "a_y", "b_u", "b_v", "b_w") and multi.groups == (("a", 0, 2), ("b", 2, 5))
    probs = multi.activate(torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])).numpy()
    np.testing.assert_allclose(probs[0, :2], [0.5, 0.5])
    assert probs[0, 2:].sum() == pytest.approx(1.0)
    support = multi.support(probs)
    assert support[0, 2] == pytest.approx(probs[0, 2] - probs[0, 3]) and support[0, 0] == 0.0
    reg = Head.from_meta({"task": "regression", "targets": ["TMB"], "ground_truth_label": "TMB",
                          "target_mean": 5.0, "target_std": 2.0})  # fmt: skip
    assert reg.labels == ("TMB",) and float(reg.activate(torch.tensor([1.0]))[0]) == 7.0
    assert Head.from_meta({"task": "survival", "targets": ["t", "e"]}).labels == ("risk",)


def test_attention_models_get_an_attention_map(slide: Any, tmp_path: Path) -> None:
    root, truth = slide
    coords, feats, _ = _grid_features(truth)
    torch.manual_seed(0)
    model = build_model("abmil", dim_input=DIM, n_outputs=2, params={"dim_hidden": 8})
    meta = {"task": "classification", "model_name": "abmil", "model_params": {"dim_hidden": 8}, "dim_input": DIM,
            "n_outputs": 2, "feature_type": "tile", "targets": ["isMSIH"], "categories": {"isMSIH": CLASSES}}  # fmt: skip
    ckpt = save_checkpoint(tmp_path / "abmil.ckpt", model, meta)
    job = HeatmapJob(
        truth.slide_path, _h5(tmp_path / "f.h5", coords, feats), tmp_path / "out" / "slideA", "a"
    )
    res = render_slide(job, ckpt, device="cpu", ig_steps=2)
    with Image.open(job.output_dir / "raw/slideA-attention.png") as im:
        assert im.size == (64, 48) and (np.asarray(im)[..., 3] > 0).sum() == len(coords) * 64
    with np.load(res.arrays) as z:
        assert z["attention"].shape == (len(coords),) and z["attention"].sum() == pytest.approx(1.0, rel=1e-4)
    geo = json.loads(res.geojson.read_text())
    assert all("attention" in f["properties"]["measurements"] for f in geo["features"])
