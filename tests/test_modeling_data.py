"""Feature bags: STAMP's h5 layouts, virtual slides, reproducible sampling, padding and masks."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from stamp.cohort import Patient, load_cohort
from stamp.features import write_embedding, write_tile_features
from stamp.modeling.data import BagDataset, collate_bags, iter_bag_chunks, load_bag


def _grid(n: int, step: float = 256.0) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    return np.array([(x * step, y * step) for y in range(side) for x in range(side)][:n], dtype=np.float32)


def _numbered(path: Path, n: int, start: int = 0, d: int = 4) -> Path:
    """Tiles whose first feature is their number (start, start+1, ...), in (y, x) order."""
    feats = np.zeros((n, d), np.float32)
    feats[:, 0] = np.arange(start, start + n)
    return write_tile_features(
        path, feats, _grid(n), extractor="demo", tile_size_um=256.0, tile_size_px=224, code_hash="abcd1234"
    )


def _raw_h5(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["feats"] = feats
        h5["coords"] = coords
        h5.attrs.update(attrs)
    return path


def test_stamp_written_h5_with_unsorted_tiles_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    coords = _grid(9)[rng.permutation(9)]  # STAMP writes tiles in thread-completion order
    feats = rng.normal(size=(9, 6)).astype(np.float16)
    attrs = {"stamp_version": "2.5.0", "extractor": "ctranspath", "unit": "um", "tile_size_um": 256.0,
             "tile_size_px": 224, "code_hash": "0123abcd", "feat_type": "tile"}  # fmt: skip
    _raw_h5(tmp_path / "feats" / "slide.h5", feats, coords, attrs)
    pd.DataFrame({"PATIENT": ["P"], "FILENAME": ["slide.h5"]}).to_csv(tmp_path / "slide.csv", index=False)
    cohort = load_cohort(
        task="classification",
        clini_table=None,
        slide_table=tmp_path / "slide.csv",
        feature_dir=tmp_path / "feats",
        ground_truth_label=None,
        require_targets=False,
    )
    assert cohort.feature_type == "tile" and cohort.feature_info["extractor"] == "ctranspath"
    got_feats, got_coords = load_bag(cohort.patients[0].feature_files)
    assert got_feats.dtype == np.float32 and got_coords.dtype == np.float32
    np.testing.assert_array_equal(got_feats, feats.astype(np.float32))
    np.testing.assert_array_equal(got_coords, coords)


def test_historic_layouts_give_um_coords(tmp_path: Path) -> None:
    feats = np.ones((4, 3), np.float16)
    early = _raw_h5(tmp_path / "a.h5", feats, _grid(4, 256.0), {"tile_size": 256.0, "unit": "um"})
    np.testing.assert_array_equal(load_bag([early])[1], _grid(4, 256.0))
    v1 = _raw_h5(tmp_path / "c.h5", feats, _grid(4, 224.0), {"extractor": "ctranspath"})  # v1: 224-px steps
    f, c = load_bag([v1])
    np.testing.assert_allclose(c, _grid(4, 256.0), rtol=1e-6)
    assert f.shape == (4, 3)


def test_multi_slide_bag_is_a_virtual_slide(tmp_path: Path) -> None:
    a = _numbered(tmp_path / "a.h5", 4)  # 2×2 grid: x ∈ {0, 256}
    b = _numbered(tmp_path / "b.h5", 6, start=4)  # 3×2 grid: x ∈ {0, 256, 512}
    feats, coords = load_bag([a, b])
    assert feats.shape == (10, 4)
    np.testing.assert_array_equal(feats[:, 0], np.arange(10))
    np.testing.assert_array_equal(coords[:4], _grid(4))
    shifted = coords[4:]
    np.testing.assert_array_equal(shifted[:, 1], _grid(6)[:, 1])  # y untouched
    # slide b starts one tile right of slide a's right edge (256 + 256 µm) and keeps its own layout
    np.testing.assert_array_equal(shifted[:, 0], _grid(6)[:, 0] + 512 + 256)
    assert shifted[:, 0].min() >= coords[:4, 0].max() + 256 * 2


def test_slide_embeddings_give_one_row(tmp_path: Path) -> None:
    s1 = write_embedding(
        tmp_path / "s1.h5", np.array([1, 2, 3], np.float32), feat_type="slide", encoder="e", code_hash="x"
    )
    s2 = write_embedding(
        tmp_path / "s2.h5", np.array([3, 4, 5], np.float32), feat_type="slide", encoder="e", code_hash="x"
    )
    feats, coords = load_bag([s1, s2])
    np.testing.assert_array_equal(feats, [[2, 3, 4]])
    np.testing.assert_array_equal(coords, np.zeros((1, 2)))
    ds = BagDataset([Patient("P", (s1,), "a")], bag_size=512, seed=0)
    f, c, n_valid, idx = ds[0]
    assert f.shape == (1, 3) and c.shape == (1, 2) and n_valid == 1 and idx == 0
    with pytest.raises(ValueError, match="mixed"):
        load_bag([s1, _numbered(tmp_path / "t.h5", 2, d=3)])


def _patients(tmp_path: Path, sizes: list[int]) -> list[Patient]:
    out = []
    for i, n in enumerate(sizes):
        out.append(Patient(f"P{i}", (_numbered(tmp_path / f"P{i}.h5", n, start=1000 * i),), "a"))
    return out


def _bag_ids(ds: BagDataset) -> list[list[int]]:
    return [sorted(ds[i][0][: ds[i][2], 0].int().tolist()) for i in range(len(ds))]


def test_bag_sampling_is_reproducible_and_changes_per_epoch(tmp_path: Path) -> None:
    patients = _patients(tmp_path, [40, 25, 3])
    one, two = BagDataset(patients, bag_size=8, seed=7), BagDataset(patients, bag_size=8, seed=7, cache=False)
    first = _bag_ids(one)
    assert first == _bag_ids(two) == _bag_ids(one)
    assert [len(set(b)) for b in first] == [8, 8, 3]  # without replacement; short bag kept whole
    assert set(first[0]) <= set(range(40)) and set(first[1]) <= set(range(1000, 1025))
    one.set_epoch(1)
    assert one.epoch == 1
    second = _bag_ids(one)
    assert second[0] != first[0] and second[1] != first[1] and second[2] == first[2]
    assert _bag_ids(BagDataset(patients, bag_size=8, seed=8))[:2] != first[:2]


def test_bags_do_not_depend_on_dataloader_workers(tmp_path: Path) -> None:
    patients = _patients(tmp_path, [30, 20, 12, 9])

    def run(workers: int) -> list[torch.Tensor]:
        ds = BagDataset(patients, bag_size=6, seed=3)
        loader = DataLoader(
            ds,
            batch_size=2,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_bags,
            persistent_workers=workers > 0,
        )
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            out += [feats for feats, _, _, _ in loader]
        return out

    serial, parallel = run(0), run(2)
    assert len(serial) == 4
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(serial[0], serial[2])  # epoch 1 draws other tiles


def test_padding_and_mask(tmp_path: Path) -> None:
    patients = _patients(tmp_path, [3, 5])
    ds = BagDataset(patients, bag_size=4, seed=0)
    feats, coords, n_valid, idx = ds[0]
    # fewer tiles than bag_size: the bag comes unpadded; the batch is padded to its longest bag
    assert feats.shape == (3, 4) and coords.shape == (3, 2) and (n_valid, idx) == (3, 0)
    np.testing.assert_array_equal(feats[:3, 0].numpy(), [0, 1, 2])
    batch = collate_bags([ds[0], ds[1]])
    assert not batch[0][0, 3:].any() and not batch[1][0, 3:].any()
    assert batch[0].shape == (2, 4, 4)
    assert batch[2].tolist() == [[False, False, False, True], [False, False, False, False]]
    assert batch[3].tolist() == [0, 1]
    full = BagDataset(patients, bag_size=None, seed=0)
    assert [full[i][0].shape[0] for i in range(2)] == [3, 5]
    f, c, mask, idx = collate_bags([full[1], full[0]])
    assert f.shape == (2, 5, 4) and c.shape == (2, 5, 2)
    assert mask.tolist() == [[False] * 5, [False, False, False, True, True]]
    np.testing.assert_array_equal(f[1, :, 0].numpy(), [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(f[0, :, 0].numpy(), [1000, 1001, 1002, 1003, 1004])
    assert idx.tolist() == [1, 0] and mask.dtype == torch.bool


def test_bags_are_read_once_per_process_and_again_when_the_file_changes(tmp_path: Path) -> None:
    from stamp.modeling.data import BagStore, bag_store

    patients = _patients(tmp_path, [5])
    store = bag_store()
    cached, uncached = BagDataset(patients, bag_size=None, seed=0), BagDataset(patients, None, 0, cache=False)
    before = store.reads
    cached[0], cached[0], BagDataset(patients, None, 0)[0]
    assert store.reads == before + 1  # every cached dataset in this process shares the bag
    assert cached[0][0].dtype == torch.float32
    _numbered(patients[0].feature_files[0], 7, start=0)  # rewritten: another identity, read again
    assert cached[0][2] == 7 and store.reads == before + 2
    tiny = BagStore(max_bytes=0)  # a bag larger than the budget is served, not kept
    assert tiny.get(patients[0].feature_files)[0].shape == (7, 4)
    assert tiny.fits([patients[0].feature_files]) is False
    assert BagStore().fits([patients[0].feature_files]) is True
    patients[0].feature_files[0].unlink()
    with pytest.raises(Exception, match="P0.h5"):
        uncached[0]


def test_iter_bag_chunks() -> None:
    feats = np.arange(10 * 2).reshape(10, 2)
    chunks = list(iter_bag_chunks(feats, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), feats)
    with pytest.raises(ValueError):
        list(iter_bag_chunks(feats, 0))
