"""Planted-signal cohorts of STAMP-layout tile features, for benchmarks and tests of the modeling stage.

:func:`write_planted_cohort` writes what a STAMP user has after ``stamp preprocess``: one h5 per slide
the way STAMP 2.5 writes it (``feats`` float16 (N, D), ``coords`` float32 µm top-left, STAMP's attrs,
tiles in no particular order), a clinical table and a slide table. Tile features are standard normal
noise plus a per-patient offset ("batch effect") along a few random directions; a patient's latent
``z`` ∈ [0, 1] plants a shift of ``strength`` (Euclidean norm, along one fixed random direction) into
a share ``fraction · z`` of its tiles (twice that for the continuous targets of regression and
survival cohorts, whose z is spread over [0, 1]). The latent drives every target column at once:

* ``isMSIH``: ``MSIH`` (z = 1) for every other patient, ``nonMSIH`` (z = 0) otherwise
  (classification cohorts);
* ``TMB`` = 10 + 30 z + N(0, 2) (regression cohorts: z ~ U(0, 1));
* ``OS_time`` / ``OS_event``: exponential survival with hazard ∝ exp(2.5 z), ~25 % censored
  (survival cohorts: z ~ U(0, 1)).

Two signal kinds (:data:`SIGNALS`) bracket what mean pooling can see:

* ``mean``: a weak shift in 5 % of the tiles, no batch effect along it: the bag mean moves, so a
  mean-pool + linear model sees it;
* ``few``: a strong shift in 1 % of the tiles (at least 2 tiles when z = 1) and a patient-level batch
  effect along the same direction that swamps the bag-mean shift: only a model that looks at single
  tiles (attention) can find it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

__all__ = ["SIGNALS", "PlantedCohort", "write_planted_cohort"]

#: signal kind → (fraction of tiles at z = 1, shift norm, batch-effect std along the signal direction)
SIGNALS: dict[str, tuple[float, float, float]] = {
    "mean": (0.05, 8.0, 0.0),
    "few": (0.01, 8.0, 0.6),
}
STAMP_ATTRS = {
    "stamp_version": "2.5.0",
    "extractor": "ctranspath",
    "unit": "um",
    "tile_size_um": 256.0,
    "tile_size_px": 224,
    "code_hash": "0123abcd",
    "feat_type": "tile",
}
_LABELS = {
    "classification": {"ground_truth_label": "isMSIH"},
    "regression": {"ground_truth_label": "TMB"},
    "survival": {"time_label": "OS_time", "status_label": "OS_event"},
}


@dataclass(frozen=True)
class PlantedCohort:
    """Where a planted cohort lies; ``section`` holds the crossval/training keys for it."""

    root: Path
    clini_table: Path
    slide_table: Path
    feature_dir: Path
    task: str
    latent: dict[str, float] = field(default_factory=dict)

    @property
    def section(self) -> dict[str, Any]:
        """``clini_table, slide_table, feature_dir, task`` and the task's label keys."""
        return {
            "task": self.task,
            "clini_table": self.clini_table,
            "slide_table": self.slide_table,
            "feature_dir": self.feature_dir,
            **_LABELS[self.task],
        }


def _grid(n: int, rng: np.random.Generator) -> np.ndarray:
    side = math.ceil(math.sqrt(n))
    cells = np.array([(x, y) for y in range(side) for x in range(side)], dtype=np.float32)[:n] * 256.0
    return cells[rng.permutation(n)]  # STAMP writes tiles in thread-completion order


def write_planted_cohort(
    root: Path,
    *,
    n_patients: int = 60,
    task: str = "classification",
    signal: str = "mean",
    dim: int = 768,
    tiles: tuple[int, int] = (500, 3000),
    fraction: float | None = None,
    strength: float | None = None,
    batch_effect: float | None = None,
    seed: int = 0,
) -> PlantedCohort:
    """Write a planted cohort under ``root`` (see the module docstring); returns its paths.

    ``fraction`` / ``strength`` / ``batch_effect`` override the ``signal`` preset; ``tiles`` is the
    range of tiles per patient (inclusive); every fifth patient has two slides.
    """
    if task not in _LABELS:
        raise ValueError(f"task must be one of {', '.join(_LABELS)}, not {task!r}")
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, not {signal!r}")
    preset = SIGNALS[signal]
    frac = preset[0] if fraction is None else fraction
    shift = preset[1] if strength is None else strength
    batch = preset[2] if batch_effect is None else batch_effect
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    nuisance = rng.normal(size=(4, dim)) / math.sqrt(dim)  # other batch-effect directions
    root = Path(root)
    feat_dir = root / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    slide_rows: list[dict[str, str]] = []
    latent: dict[str, float] = {}
    for i in range(n_patients):
        pid = f"PAT{i:04d}"
        z = float(i % 2 == 0) if task == "classification" else float(rng.uniform(0, 1))
        latent[pid] = z
        n_total = int(rng.integers(tiles[0], tiles[1] + 1))
        offset = rng.normal(0, batch) * direction + rng.normal(0, 0.6, size=4) @ nuisance
        n_planted = round(frac * z * n_total * (1 if task == "classification" else 2))
        if signal == "few" and z >= 1:
            n_planted = max(n_planted, 2)
        x = rng.standard_normal((n_total, dim), dtype=np.float32) + offset.astype(np.float32)
        planted = rng.choice(n_total, n_planted, replace=False)
        x[planted] += (shift * direction).astype(np.float32)
        n_slides = 2 if i % 5 == 4 and n_total >= 4 else 1
        cuts = np.array_split(np.arange(n_total), n_slides)
        for s, part in enumerate(cuts):
            name = f"{pid}-slide{s}.h5"
            with h5py.File(feat_dir / name, "w") as h5:
                h5["feats"] = x[part].astype(np.float16)
                h5["coords"] = _grid(len(part), rng)
                h5.attrs.update(STAMP_ATTRS)
            slide_rows.append({"PATIENT": pid, "FILENAME": name})
        time = rng.exponential(365 * 4 * math.exp(-2.5 * z))
        censor = rng.exponential(365 * 12)
        rows.append(
            {
                "PATIENT": pid,
                "isMSIH": "MSIH" if z >= 0.5 else "nonMSIH",
                "TMB": round(10 + 30 * z + rng.normal(0, 2), 3),
                "OS_time": round(min(time, censor), 2),
                "OS_event": int(time <= censor),
            }
        )
    clini = root / "clini.csv"
    slides = root / "slide.csv"
    pd.DataFrame(rows).to_csv(clini, index=False)
    pd.DataFrame(slide_rows).to_csv(slides, index=False)
    return PlantedCohort(root, clini, slides, feat_dir, task, latent)
