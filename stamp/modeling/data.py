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

from collections.abc import Iterator, Sequence
from pathlib import Path

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
        x = np.asarray(f.feats, dtype=np.float32)
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
        return np.mean(np.concatenate(feats), axis=0, keepdims=True), np.zeros((1, 2), np.float32), kind
    return np.concatenate(feats), np.concatenate(coords), kind


def load_bag(files: Sequence[Path]) -> Bag:
    """feats float32 (N, D) and coords float32 (N, 2) µm of one patient (see module docstring)."""
    feats, coords, _ = _load(files)
    return feats, coords


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
        cache_max_bytes: int = 2 << 30,
    ) -> None:
        if bag_size is not None and bag_size < 1:
            raise ValueError(f"bag_size must be ≥ 1 or None, not {bag_size}")
        self.patients = list(patients)
        self.bag_size = bag_size
        self.seed = seed
        self.cache = cache
        self.cache_max_bytes = cache_max_bytes
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.patients)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Draw the bags of ``epoch`` from now on (also in running DataLoader workers)."""
        self._epoch.fill_(int(epoch))

    def _bag(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        if index in self._cache:
            return self._cache[index]
        bag = _load(self.patients[index].feature_files)
        size = bag[0].nbytes + bag[1].nbytes
        if self.cache and self._cached_bytes + size <= self.cache_max_bytes:
            self._cache[index] = bag
            self._cached_bytes += size
        return bag

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> Item:
        feats, coords, kind = self._bag(index)
        n = len(feats)
        if self.bag_size is None or kind != "tile" or n <= self.bag_size:
            return torch.from_numpy(feats), torch.from_numpy(coords), n, index
        pick = np.sort(self._rng(index).choice(n, self.bag_size, replace=False))
        return torch.from_numpy(feats[pick]), torch.from_numpy(coords[pick]), self.bag_size, index


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
