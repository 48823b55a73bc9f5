"""Feature h5 format: our files match STAMP's layout, STAMP's historic files load."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from stamp.features import FeatureFileError, read_features, write_embedding, write_tile_features
from tests.conftest import leftover_temps


def _tiles(n: int = 50, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.array([(x, y) for y in range(10) for x in range(10)], dtype=np.float32) * 256.0
    coords = grid[rng.permutation(len(grid))[:n]]
    return rng.normal(size=(n, d)).astype(np.float32), coords


def test_write_sorts_by_yx_with_stamp_attrs(tmp_path: Path) -> None:
    feats, coords = _tiles()
    out = write_tile_features(
        tmp_path / "a" / "slide.h5",
        feats,
        coords,
        extractor="demo",
        tile_size_um=256.0,
        tile_size_px=224,
        code_hash="abcd1234",
        extra_attrs={
            "slide_sha256": "f" * 64,
            "mpp_requested": 256 / 224,
            "mpp_effective": 1.0,
            "reader": "openslide",
        },
    )
    with h5py.File(out) as h5:
        assert h5["feats"].dtype == np.float16 and h5["coords"].dtype == np.float32
        assert h5["coords"].shape == (50, 2)
        for key, value in {
            "extractor": "demo",
            "unit": "um",
            "feat_type": "tile",
            "code_hash": "abcd1234",
        }.items():
            assert h5.attrs[key] == value
        assert h5.attrs["tile_size_um"] == 256.0 and h5.attrs["tile_size_px"] == 224
        assert h5.attrs["stamp_version"] == "2.5.0" and h5.attrs["slide_sha256"] == "f" * 64
        stored = h5["coords"][()]
    order = np.lexsort((stored[:, 0], stored[:, 1]))
    assert np.array_equal(order, np.arange(len(stored))), "tiles must be sorted by (y, x)"
    back = read_features(out)
    # the features travel with their coordinates through the sort
    idx = {tuple(c): i for i, c in enumerate(coords)}
    for row, c in enumerate(back.coords_um):
        np.testing.assert_allclose(back.feats[row], feats[idx[tuple(c)]].astype(np.float16))
    assert back.mpp == pytest.approx(256 / 224) and back.layout == "current"
    assert not leftover_temps(out.parent), "no temp file may be left behind"


def test_same_input_same_bytes(tmp_path: Path) -> None:
    feats, coords = _tiles()
    kw = dict(extractor="demo", tile_size_um=256.0, tile_size_px=224, code_hash="x")
    a = write_tile_features(tmp_path / "a.h5", feats, coords, **kw)
    b = write_tile_features(tmp_path / "b.h5", feats[::-1], coords[::-1], **kw)
    assert a.read_bytes() == b.read_bytes()


def _raw_h5(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict) -> Path:
    with h5py.File(path, "w") as h5:
        h5["feats"] = feats
        h5["coords"] = coords
        h5.attrs.update(attrs)
    return path


def test_reads_stamp_current_unsorted(tmp_path: Path) -> None:
    feats, coords = _tiles(seed=3)
    attrs = {"stamp_version": "2.5.0", "extractor": "ctranspath", "unit": "um", "tile_size_um": 256.0}
    attrs |= {"tile_size_px": 224, "code_hash": "deadbeef", "feat_type": "tile"}
    f = read_features(_raw_h5(tmp_path / "s.h5", feats.astype(np.float16), coords, attrs))
    assert f.extractor == "ctranspath" and f.feat_type == "tile" and f.tile_size_um == 256.0
    np.testing.assert_array_equal(f.coords_um, coords)


def test_reads_early_v2_tile_size_attr(tmp_path: Path) -> None:
    feats, coords = _tiles()
    f = read_features(_raw_h5(tmp_path / "e.h5", feats, coords, {"tile_size": 512.0, "unit": "um"}))
    assert f.tile_size_um == 512.0 and f.layout == "early-v2"


def test_reads_v1_pixel_coords(tmp_path: Path) -> None:
    feats, _ = _tiles()
    coords = np.array([[x * 224, y * 224] for y in range(5) for x in range(10)], dtype=np.float32)
    f = read_features(_raw_h5(tmp_path / "v1.h5", feats, coords, {}))
    assert f.layout == "v1" and f.tile_size_um == 256.0 and f.tile_size_px == 224
    np.testing.assert_allclose(f.coords_um[1], [256.0, 0.0], rtol=1e-6)


def test_unknown_geometry_and_bad_file_name_the_file(tmp_path: Path) -> None:
    feats, coords = _tiles()
    bad = _raw_h5(tmp_path / "odd.h5", feats, coords * 0.37, {})
    with pytest.raises(FeatureFileError, match="odd.h5.*tile_size_um"):
        read_features(bad)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        read_features(junk)


def test_slide_embedding_roundtrip(tmp_path: Path) -> None:
    emb = np.arange(16, dtype=np.float32)
    out = write_embedding(tmp_path / "p.h5", emb, feat_type="patient", encoder="titan", code_hash="c0ffee00")
    f = read_features(out)
    assert f.feat_type == "patient" and f.extractor == "titan" and f.feats.shape == (1, 16)
    assert f.coords_um is None
