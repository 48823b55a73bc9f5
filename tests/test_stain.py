"""Stain normalisation (Macenko / Reinhard) on synthetic H&E tiles made by Beer-Lambert mixing."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest

from stamp.slides import stain_common
from stamp.slides.stain import StainNormalizer, fit_slide_params, get_normalizer
from stamp.slides.stain_common import (
    MACENKO_REFERENCE_MAX_CONCENTRATIONS,
    MACENKO_REFERENCE_STAINS,
    REINHARD_REFERENCE_MEAN,
    REINHARD_REFERENCE_STD,
    StainFitError,
    sample_indices,
)
from stamp.slides.stain_macenko import MacenkoNormalizer
from stamp.slides.stain_reinhard import ReinhardNormalizer, derive_reinhard_reference


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


REF = _unit(MACENKO_REFERENCE_STAINS)  # (2, 3): H, E
# a clearly different H&E look (bluer haematoxylin, more magenta eosin)
SHIFTED = _unit([[0.65, 0.70, 0.30], [0.10, 0.85, 0.50]])


def _concentrations(n: int, size: int = 64, seed: int = 0, background: float = 0.2) -> np.ndarray:
    """(n, size, size, 2) H and E concentrations: sparse exponential fields plus background."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size)
    c_h = rng.exponential(0.6, shape) * (rng.random(shape) < 0.5)
    c_e = rng.exponential(0.35, shape) * (rng.random(shape) < 0.85)
    tissue = rng.random(shape) >= background
    return np.stack([c_h * tissue, c_e * tissue], axis=-1)


def _render(conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Beer-Lambert: I = 255 * exp(-C @ S), rounded to uint8."""
    od = conc @ np.asarray(stains)
    return np.clip(np.floor(255.0 * np.exp(-od) + 0.5), 0, 255).astype(np.uint8)


def _od(tiles: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(tiles.reshape(-1, 3).astype(np.float64), 1.0) / 255.0)


def _lab_float(rgb: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(rgb.reshape(-1, 1, 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    lab[:, 0] *= 100.0 / 255.0
    lab[:, 1:] -= 128.0
    return lab


@pytest.fixture(scope="module")
def ref_tiles() -> np.ndarray:
    return _render(_concentrations(16, seed=1), REF)


@pytest.fixture(scope="module")
def shifted_conc() -> np.ndarray:
    return _concentrations(16, seed=2)


@pytest.fixture(scope="module")
def shifted_tiles(shifted_conc: np.ndarray) -> np.ndarray:
    return _render(shifted_conc, SHIFTED)


NAMES = ["macenko", "reinhard"]


# --------------------------------------------------------------------------------- Macenko


@pytest.mark.parametrize("stains", [REF, SHIFTED], ids=["reference", "shifted"])
def test_macenko_recovers_stain_vectors_h_first(stains: np.ndarray) -> None:
    tiles = _render(_concentrations(16, seed=3), stains)
    params = MacenkoNormalizer().fit(tiles)
    fitted = np.asarray(params["stain_matrix"])
    assert fitted.shape == (2, 3)
    cos = np.sum(fitted * stains, axis=1)  # row i vs true stain i: H must come first
    assert np.all(cos >= 0.98), cos
    assert fitted[0, 0] > fitted[1, 0]  # H = larger red OD component
    assert np.all(fitted > 0)  # deterministic (positive) sign
    assert params["n_tissue_pixels"] >= 5_000


def test_macenko_brings_od_vectors_to_reference(shifted_conc: np.ndarray, shifted_tiles) -> None:
    norm = MacenkoNormalizer()
    params = norm.fit(shifted_tiles)
    out = norm.transform(shifted_tiles, params)
    # what the same tissue would look like stained with the reference, with each stain's
    # concentrations scaled to the reference pseudo-maximum
    scale = np.asarray(MACENKO_REFERENCE_MAX_CONCENTRATIONS) / np.percentile(
        shifted_conc.reshape(-1, 2), 99, axis=0
    )
    ideal = _render(shifted_conc * scale, REF)

    od_ideal = _od(ideal)
    tissue = np.all(od_ideal > 0.15, axis=1) & np.all(_od(shifted_tiles) > 0.15, axis=1)

    def mean_angle_deg(tiles: np.ndarray) -> float:
        a, b = _unit(_od(tiles)[tissue]), _unit(od_ideal[tissue])
        return float(np.degrees(np.arccos(np.clip(np.sum(a * b, axis=1), -1, 1))).mean())

    before, after = mean_angle_deg(shifted_tiles), mean_angle_deg(out)
    assert before > 4.0  # the shift is real (measured ~6 deg)
    assert after < 1.0 and after < before / 10, (before, after)  # measured ~0.2 deg
    # stain-plane residual of the output's OD vectors is small (all colours are ref mixtures)
    q, _ = np.linalg.qr(REF.T)
    v = _unit(_od(out)[tissue])
    residual = np.linalg.norm(v - (v @ q) @ q.T, axis=1).mean()
    v0 = _unit(_od(shifted_tiles)[tissue])
    assert residual < 0.2 * np.linalg.norm(v0 - (v0 @ q) @ q.T, axis=1).mean()
    # intensity error vs the ideal rendering drops too
    err_before = np.abs(shifted_tiles.astype(int) - ideal).mean()  # measured ~7.2 levels
    assert np.abs(out.astype(int) - ideal).mean() < 0.1 * err_before  # measured ~0.15


def test_macenko_od_matrix_is_identity_for_reference_params() -> None:
    params = {
        "method": "macenko",
        "stain_matrix": REF.tolist(),
        "max_concentrations": list(MACENKO_REFERENCE_MAX_CONCENTRATIONS),
        "target_stain_matrix": REF.tolist(),
        "target_max_concentrations": list(MACENKO_REFERENCE_MAX_CONCENTRATIONS),
    }
    m = MacenkoNormalizer.od_matrix(params)
    # a projection onto the stain plane: maps every reference mixture to itself
    np.testing.assert_allclose(REF @ m, REF, atol=1e-12)
    tiles = _render(_concentrations(2, size=32, seed=9), REF)
    out = MacenkoNormalizer().transform(tiles, params)
    assert np.abs(out.astype(int) - tiles).max() <= 1


def test_macenko_extreme_params_stay_finite() -> None:
    """Ill-conditioned (hand-made) params: still valid uint8, white stays white, no overflow."""
    params = {
        "method": "macenko",
        "stain_matrix": _unit([[0.60, 0.70, 0.39], [0.58, 0.71, 0.40]]).tolist(),
        "max_concentrations": [0.01, 5.0],
        "target_stain_matrix": REF.tolist(),
        "target_max_concentrations": list(MACENKO_REFERENCE_MAX_CONCENTRATIONS),
    }
    tiles = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tiles[:, 0, 0] = 255
    with np.errstate(all="raise"):
        out = MacenkoNormalizer().transform(tiles, params)
    assert out.dtype == np.uint8 and (out[:, 0, 0] == 255).all()


def test_macenko_collinear_stains_raise() -> None:
    conc = _concentrations(8, seed=4)
    one_stain = _render(conc[..., :1] + conc[..., 1:], REF[:1])  # haematoxylin only
    with pytest.raises(StainFitError, match="collinear"):
        MacenkoNormalizer().fit(one_stain)


def test_macenko_brightness_standardisation_option(ref_tiles: np.ndarray) -> None:
    dim = (ref_tiles.astype(np.float64) * (230 / 255)).round().astype(np.uint8)  # grey background
    plain = MacenkoNormalizer().fit(dim)
    assert plain["brightness_scale"] == 1.0
    norm = MacenkoNormalizer(luminosity_percentile=90)
    params = norm.fit(dim)
    assert params["brightness_scale"] > 1.05
    out = norm.transform(dim, params)
    was_background = np.all(dim.reshape(-1, 3) == 230, axis=1)
    assert was_background.any()
    assert out.reshape(-1, 3)[was_background].min() >= 250  # background restored to white


# --------------------------------------------------------------------------------- Reinhard


def test_reinhard_matches_target_lab_statistics(shifted_tiles: np.ndarray) -> None:
    norm = ReinhardNormalizer()
    params = norm.fit(shifted_tiles)
    src = _lab_float(shifted_tiles)
    tissue = (src[:, 0] < norm.tissue_max_lightness) & (shifted_tiles.reshape(-1, 3).max(axis=1) > 5)
    np.testing.assert_allclose(params["lab_mean"], src[tissue].mean(axis=0), atol=1e-9)
    # the source really differs from the target
    assert np.abs(np.asarray(params["lab_mean"]) - REINHARD_REFERENCE_MEAN).max() > 5

    out = _lab_float(norm.transform(shifted_tiles, params))[tissue]
    np.testing.assert_allclose(out.mean(axis=0), REINHARD_REFERENCE_MEAN, atol=1.0)
    np.testing.assert_allclose(out.std(axis=0), REINHARD_REFERENCE_STD, atol=1.0)


def test_reinhard_custom_target_from_image(ref_tiles: np.ndarray, shifted_tiles: np.ndarray) -> None:
    custom = ReinhardNormalizer().fit_target(ref_tiles)
    assert custom.target != ReinhardNormalizer().target
    params = custom.fit(shifted_tiles)
    assert params["target_lab_mean"] == list(custom.mean)
    src = _lab_float(shifted_tiles)
    tissue = (src[:, 0] < custom.tissue_max_lightness) & (shifted_tiles.reshape(-1, 3).max(axis=1) > 5)
    out = _lab_float(custom.transform(shifted_tiles, params))[tissue]
    np.testing.assert_allclose(out.mean(axis=0), custom.mean, atol=1.0)
    np.testing.assert_allclose(out.std(axis=0), custom.std, atol=1.0)


def test_reinhard_reference_constants_are_reproducible() -> None:
    mean, std = derive_reinhard_reference()
    np.testing.assert_allclose(mean, REINHARD_REFERENCE_MEAN, atol=0.006)
    np.testing.assert_allclose(std, REINHARD_REFERENCE_STD, atol=0.006)


def test_reinhard_uniform_colour_raises() -> None:
    flat = np.full((4, 64, 64, 3), (150, 90, 160), dtype=np.uint8)
    with pytest.raises(StainFitError, match="uniform"):
        ReinhardNormalizer().fit(flat)


# --------------------------------------------------------------------------------- both


@pytest.mark.parametrize("name", NAMES)
def test_white_background_stays_white(name: str, shifted_tiles: np.ndarray) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    params = norm.fit(shifted_tiles)
    light = np.array(
        [[255, 255, 255], [252, 252, 252], [250, 251, 253], [246, 246, 246], [248, 244, 247]],
        dtype=np.uint8,
    )
    out = norm.transform(light[None, None], params)[0, 0].astype(int)
    assert (out[0] == 255).all()
    assert np.abs(out - light).max() <= 4, out
    # white pixels inside tissue tiles too
    tiles = shifted_tiles.copy()
    tiles[:, :8, :8] = 255
    assert (norm.transform(tiles, params)[:, :8, :8] == 255).all()


@pytest.mark.parametrize("name", NAMES)
def test_too_few_tissue_pixels_raise(name: str, caplog: pytest.LogCaptureFixture) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    tiles = np.full((4, 64, 64, 3), 250, dtype=np.uint8)
    tiles[0, :10, :10] = (120, 60, 150)  # 100 tissue pixels
    with pytest.raises(StainFitError, match="too few tissue pixels"):
        norm.fit(tiles)
    black = np.zeros((2, 64, 64, 3), dtype=np.uint8)  # padding of edge tiles is not tissue
    with pytest.raises(StainFitError):
        norm.fit(black)
    with pytest.raises(StainFitError):
        norm.fit([])
    with caplog.at_level(logging.WARNING, logger="stamp"):
        assert fit_slide_params(norm, tiles, slide="s1.svs") is None
    assert "s1.svs" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_json_round_trip(name: str, shifted_tiles: np.ndarray) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    params = norm.fit(shifted_tiles)
    assert params == get_normalizer(name).fit(shifted_tiles.copy())  # type: ignore[union-attr]
    text = json.dumps(params)
    assert len(text) < 2_000
    loaded = json.loads(text)
    assert loaded == params and loaded["method"] == name
    out = norm.transform(shifted_tiles, params)
    assert out.dtype == np.uint8 and out.shape == shifted_tiles.shape
    assert out.tobytes() == norm.transform(shifted_tiles, loaded).tobytes()
    assert out.tobytes() == norm.transform(shifted_tiles.copy(), params).tobytes()
    assert not np.array_equal(out, shifted_tiles)


@pytest.mark.parametrize("name", NAMES)
def test_transform_is_tile_independent(
    name: str, shifted_tiles: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    params = norm.fit(shifted_tiles)
    batch = norm.transform(shifted_tiles, params)
    for i in (0, 5, 15):
        single = norm.transform(shifted_tiles[i], params)  # (H, W, 3) in, (H, W, 3) out
        assert single.shape == shifted_tiles[i].shape
        assert single.tobytes() == batch[i].tobytes()
    order = np.random.default_rng(0).permutation(len(shifted_tiles))
    assert norm.transform(shifted_tiles[order], params).tobytes() == batch[order].tobytes()
    # chunking inside transform does not matter either (odd chunk size, boundaries mid-tile)
    monkeypatch.setattr(stain_common, "CHUNK_PIXELS", 1_001)
    assert norm.transform(shifted_tiles, params).tobytes() == batch.tobytes()
    # odd tile sizes
    odd = shifted_tiles[:3, :37, :53]
    full = norm.transform(np.ascontiguousarray(odd), params)
    assert norm.transform(np.ascontiguousarray(odd[1]), params).tobytes() == full[1].tobytes()


@pytest.mark.parametrize("name", NAMES)
def test_fit_uses_deterministic_slide_sample(name: str) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    tiles = _render(_concentrations(100, size=48, seed=5), SHIFTED)
    params = norm.fit(tiles)
    assert params["n_tiles"] == 64
    as_list = norm.fit(list(tiles))
    assert as_list == params
    idx = sample_indices(len(tiles), 64)
    assert params == norm.fit(tiles[idx])  # exactly the sampled tiles were used
    small = norm.fit(tiles, max_tiles=20)
    assert small["n_tiles"] == 20 and small != params


def test_sample_indices() -> None:
    assert sample_indices(0).size == 0
    np.testing.assert_array_equal(sample_indices(5, 64), np.arange(5))
    idx = sample_indices(1000, 64)
    assert len(idx) == 64 and len(np.unique(idx)) == 64
    assert idx.min() >= 0 and idx.max() < 1000 and np.all(np.diff(idx) > 0)
    assert idx[0] < 20 and idx[-1] > 980  # spread over the whole slide
    np.testing.assert_array_equal(idx, sample_indices(1000, 64))
    assert len(sample_indices(65, 64)) == 64


# --------------------------------------------------------------------------------- API


def test_get_normalizer_names_and_protocol() -> None:
    assert get_normalizer(None) is None
    assert get_normalizer("none") is None
    m, r = get_normalizer("macenko"), get_normalizer("Reinhard")
    assert isinstance(m, MacenkoNormalizer) and isinstance(r, ReinhardNormalizer)
    assert isinstance(m, StainNormalizer) and isinstance(r, StainNormalizer)
    assert m.name == "macenko" and r.name == "reinhard"
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        get_normalizer("vahadane")
    json.dumps(m.target), json.dumps(r.target)
    np.testing.assert_allclose(m.target["stain_matrix"], REF, atol=1e-12)
    assert m.target["max_concentrations"] == list(MACENKO_REFERENCE_MAX_CONCENTRATIONS)
    assert r.target == {"lab_mean": list(REINHARD_REFERENCE_MEAN), "lab_std": list(REINHARD_REFERENCE_STD)}


@pytest.mark.parametrize("name", NAMES)
def test_custom_target_from_image_and_dict(name: str, ref_tiles: np.ndarray, shifted_tiles) -> None:
    fitted = get_normalizer(name, target=shifted_tiles)
    assert fitted is not None and fitted.target != get_normalizer(name).target  # type: ignore[union-attr]
    again = get_normalizer(name, target=fitted.target)
    assert again == fitted
    if name == "macenko":
        cos = np.sum(np.asarray(fitted.target["stain_matrix"]) * SHIFTED, axis=1)
        assert np.all(cos >= 0.98)
        # normalising reference-stained tiles to the shifted target brings them to the shifted look
        params = fitted.fit(ref_tiles)
        out = fitted.transform(ref_tiles, params)
        refit = MacenkoNormalizer().fit(out)
        assert np.all(np.sum(np.asarray(refit["stain_matrix"]) * SHIFTED, axis=1) >= 0.98)


@pytest.mark.parametrize("name", NAMES)
def test_transform_rejects_bad_input(name: str, shifted_tiles: np.ndarray) -> None:
    norm = get_normalizer(name)
    assert norm is not None
    params = norm.fit(shifted_tiles)
    with pytest.raises(TypeError):
        norm.transform(shifted_tiles.astype(np.float32), params)
    with pytest.raises(ValueError):
        norm.transform(shifted_tiles[..., :2], params)
    other = "reinhard" if name == "macenko" else "macenko"
    with pytest.raises(ValueError, match="params are for"):
        norm.transform(shifted_tiles, {**params, "method": other})
    empty = norm.transform(shifted_tiles[:0], params)
    assert empty.shape == (0, *shifted_tiles.shape[1:])
