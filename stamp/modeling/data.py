"""Feature bags per patient for the MIL models.

A patient's bag is the tiles of all its slides, concatenated; each later slide is shifted right of
the previous ones (a "virtual slide"), so coordinate-aware models never see two slides overlap.
Slide / patient embeddings give a (1, D) bag (several slide embeddings of one patient are averaged)
with zero coords. :class:`BagDataset` samples training bags reproducibly: the tiles drawn for an
item depend only on (seed, epoch, index), never on DataLoader workers or the order items are asked
for. Call :meth:`BagDataset.set_epoch` before iterating a loader (the epoch lives in shared memory,
so persistent workers see it too).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from stamp.cohort import Patient
from stamp.features import FeatureFileError, read_features

Bag = tuple[np.ndarray, np.ndarray]
Item = tuple[torch.Tensor, torch.Tensor, int, int]


def _tile_size(coords: np.ndarray, tile_size_um: float | None) -> float:
    """The file's tile size, else the smallest coordinate step (0 for a single tile)."""
    if tile_size_um:
        return float(tile_size_um)
    steps = np.concatenate([np.diff(np.unique(coords[:, a])) for a in (0, 1)])
    return float(steps.min()) if len(steps) else 0.0


def _load(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, str]:
    if not files:
        raise ValueError("a bag needs at least one feature file")
    feats: list[np.ndarray] = []
    coords: list[np.ndarray] = []
    kinds: set[str] = set()
    right: float | None = None  # right edge (µm) of the virtual slide so far
    for path in files:
        f = read_features(path)
        kinds.add(f.feat_type)
        if len(kinds) > 1:
            raise FeatureFileError(f"{path}: {f.feat_type} features mixed with {sorted(kinds)} in one bag")
        x = np.asarray(f.feats)
        if x.dtype not in (np.float16, np.float32):
            x = x.astype(np.float32)
        if feats and x.shape[1] != feats[0].shape[1]:
            raise FeatureFileError(
                f"{path}: feature dim {x.shape[1]} differs from {feats[0].shape[1]} ({files[0]})"
            )
        feats.append(x)
        if f.feat_type != "tile" or f.coords_um is None:
            continue
        c = np.array(f.coords_um, dtype=np.float32).reshape(-1, 2)
        if len(c):
            tile = _tile_size(c, f.tile_size_um)
            if right is not None:
                c[:, 0] += np.float32(right + tile - c[:, 0].min())
            right = float(c[:, 0].max()) + tile
        coords.append(c)
    (kind,) = kinds
    if kind != "tile":
        joined = np.concatenate([x.astype(np.float32) for x in feats])
        return np.mean(joined, axis=0, keepdims=True), np.zeros((1, 2), np.float32), kind
    if len({x.dtype for x in feats}) > 1:
        feats = [x.astype(np.float32) for x in feats]
    return np.concatenate(feats), np.concatenate(coords), kind


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    st = os.stat(path)
    return (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _default_budget() -> int:
    env = os.environ.get("STAMP_BAG_CACHE_BYTES")
    if env:
        return max(0, int(env))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return int(min(8 << 30, memory // 4))


class BagStore:
    """Process-wide LRU cache of bags (feats as stored, coords, feature type), bounded in bytes.

    Thread-safe; a bag larger than the whole budget is returned without being kept.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = _default_budget() if max_bytes is None else max_bytes
        self._bags: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0  # bags read from disk (for tests and benchmarks)

    def get(self, files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, str]:
        """The bag of ``files`` (see :func:`load_bag`), from memory when this process read it before."""
        key = tuple(_file_key(Path(f)) for f in files)
        with self._lock:
            bag = self._bags.get(key)
            if bag is not None:
                self._bags.move_to_end(key)
                return bag
        bag = _load(files)
        size = bag[0].nbytes + bag[1].nbytes
        with self._lock:
            self.reads += 1
            if size <= self.max_bytes and key not in self._bags:
                self._bags[key] = bag
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._bags.popitem(last=False)
                    self._bytes -= old[0].nbytes + old[1].nbytes
        return bag

    def fits(self, files: Sequence[Sequence[Path]]) -> bool:
        """Load every bag of ``files``; whether all of them are now held in memory together."""
        keys = []
        for f in files:
            self.get(f)
            keys.append(tuple(_file_key(Path(x)) for x in f))
        with self._lock:
            return all(k in self._bags for k in keys)

    def clear(self) -> None:
        with self._lock:
            self._bags.clear()
            self._bytes = 0


_STORE: BagStore | None = None
_STORE_LOCK = threading.Lock()


def bag_store() -> BagStore:
    """The process-wide :class:`BagStore`."""
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = BagStore()
        return _STORE


def load_bag(files: Sequence[Path]) -> Bag:
    """feats float32 (N, D) and coords float32 (N, 2) µm of one patient (see module docstring)."""
    feats, coords, _ = bag_store().get(files)
    return feats.astype(np.float32), coords


class BagDataset(Dataset[Item]):
    """``patients[i]`` → (feats (bag, D), coords (bag, 2), n_valid, i) as tensors.

    ``bag_size`` set (tile features): ``bag_size`` tiles drawn without replacement; a patient with
    fewer tiles gives all of them, unpadded — :func:`collate_bags` pads a batch only to its longest
    bag and masks the padding, so small bags do not pay for ``bag_size`` zeros (STAMP pads every
    bag to ``bag_size``). ``bag_size`` None, or slide / patient features: the full bag. ``cache`` keeps loaded bags in memory up to ``cache_max_bytes`` per
    process; returned tensors may share that memory, so do not modify them in place.
    """

    def __init__(
        self,
        patients: list[Patient],
        bag_size: int | None,
        seed: int | None,
        cache: bool = True,
    ) -> None:
        if bag_size is not None and bag_size < 1:
            raise ValueError(f"bag_size must be ≥ 1 or None, not {bag_size}")
        self.patients = list(patients)
        self.bag_size = bag_size
        self.seed = seed
        self.cache = cache
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Draw the bags of ``epoch`` from now on (also in running DataLoader workers)."""
        self._epoch.fill_(int(epoch))

    def _bag(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        files = self.patients[index].feature_files
        return bag_store().get(files) if self.cache else _load(files)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> Item:
        feats, coords, kind = self._bag(index)
        n = len(feats)
        if self.bag_size is None or kind != "tile" or n <= self.bag_size:
            return torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(coords.copy()), n, index
        pick = np.sort(self._rng(index).choice(n, self.bag_size, replace=False))
        return (
            torch.from_numpy(feats[pick].astype(np.float32)),
            torch.from_numpy(coords[pick]),
            self.bag_size,
            index,
        )


def collate_bags(
    batch: Sequence[tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to the longest: feats (B, Nmax, D), coords (B, Nmax, 2), mask (B, Nmax) True = padding, idx (B,)."""
    n_max = max(len(item[0]) for item in batch)
    dim = batch[0][0].shape[1]
    feats = torch.zeros(len(batch), n_max, dim)
    coords = torch.zeros(len(batch), n_max, 2)
    mask = torch.ones(len(batch), n_max, dtype=torch.bool)
    for i, (f, c, n_valid, _) in enumerate(batch):
        feats[i, : len(f)] = torch.as_tensor(f)
        coords[i, : len(c)] = torch.as_tensor(c)
        mask[i, : int(n_valid)] = False
    idx = torch.tensor([int(item[3]) for item in batch], dtype=torch.long)
    return feats, coords, mask, idx


def iter_bag_chunks(feats: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """Consecutive views of at most ``chunk`` rows of ``feats`` (bounded-memory passes over huge bags)."""
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, not {chunk}")
    for start in range(0, len(feats), chunk):
        yield feats[start : start + chunk]
