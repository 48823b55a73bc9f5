"""Which slides get heatmaps: one :class:`HeatmapJob` per slide with its feature file and output folder.

Slides come from ``slide_paths`` (relative to ``wsi_dir``) or a recursive search of ``wsi_dir``.
A slide's features are found **by its path relative to** ``wsi_dir``, the way ``preprocess``
writes them (``<feature_dir>/<relative path with .h5>``), so ``a/x.svs`` and ``b/x.svs`` never
share a feature file (STAMP looks up ``<feature_dir>/<stem>.h5`` only). A flat
``<feature_dir>/<stem>.h5`` (what STAMP writes) is used only when no other planned slide has the
same stem. Outputs go to ``<output_dir>/<relative path without suffix>/`` (STAMP:
``<output_dir>/<stem>/``; the same for slides directly in ``wsi_dir``).

Slides without features (or missing files) are reported in :attr:`HeatmapPlan.skipped`, never
fatal; every job is independent of the others. In a watcher-started run every slide and feature file
must resolve inside the cohort's allowed folders (:func:`stamp.confinement.check_input`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stamp.config_models import HeatmapsConfig
from stamp.confinement import check_input
from stamp.slides.discovery import find_slides

__all__ = ["HeatmapError", "HeatmapJob", "HeatmapPlan", "SkippedSlide", "plan_heatmaps"]


class HeatmapError(Exception):
    """One slide's heatmaps failed; the message is one line naming the slide and what to do."""

    def __init__(self, slide: Path | str, reason: str) -> None:
        self.slide = str(slide)
        self.reason = " ".join(str(reason).split())  # always one line
        super().__init__(f"{self.slide}: {self.reason}")

    def __reduce__(self) -> tuple[type[HeatmapError], tuple[str, str]]:
        return (type(self), (self.slide, self.reason))  # picklable (Prefect task results)


@dataclass(frozen=True)
class HeatmapJob:
    """One slide to render: its file, its tile-feature h5, its output folder and a display name."""

    slide_path: Path
    feature_path: Path
    output_dir: Path
    name: str

    @property
    def stem(self) -> str:
        """The slide's file name without suffix, used in STAMP's output file names."""
        return self.slide_path.stem


@dataclass(frozen=True)
class SkippedSlide:
    """A slide that gets no heatmaps, and why (one line)."""

    slide_path: Path
    reason: str


@dataclass
class HeatmapPlan:
    """The jobs (iterate the plan to get them) and the slides left out."""

    jobs: list[HeatmapJob] = field(default_factory=list)
    skipped: list[SkippedSlide] = field(default_factory=list)

    def __iter__(self) -> Iterator[HeatmapJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> HeatmapJob:
        return self.jobs[index]


def _relative(slide: Path, wsi_dir: Path) -> Path:
    try:
        return Path(os.path.normpath(slide)).relative_to(os.path.normpath(wsi_dir))
    except ValueError:
        try:
            return slide.resolve().relative_to(wsi_dir.resolve())
        except ValueError:
            return Path(slide.name)


def _slides(sec: HeatmapsConfig) -> list[Path]:
    wsi_dir = Path(sec.wsi_dir)
    if sec.slide_paths is None:
        return find_slides(wsi_dir)
    seen: dict[Path, None] = {}
    for p in sec.slide_paths:
        seen.setdefault(check_input(os.path.normpath(wsi_dir / p), f"heatmaps.slide_paths: {str(p)!r}"), None)
    return list(seen)


def plan_heatmaps(sec: HeatmapsConfig) -> HeatmapPlan:
    """Jobs for the slides of a ``heatmaps`` section; slides without features go to ``skipped``.

    Raises ``FileNotFoundError`` (one line) only when ``wsi_dir`` or ``feature_dir`` is missing.
    """
    wsi_dir, feature_dir, out_dir = Path(sec.wsi_dir), Path(sec.feature_dir), Path(sec.output_dir)
    if not feature_dir.is_dir():
        raise FileNotFoundError(f"heatmaps.feature_dir {feature_dir} does not exist or is not a directory")
    slides = _slides(sec)
    rels = [_relative(s, wsi_dir) for s in slides]
    stems = Counter(r.stem for r in rels)
    plan = HeatmapPlan()
    for slide, rel in zip(slides, rels, strict=True):
        if not slide.is_file():
            plan.skipped.append(
                SkippedSlide(slide, f"{slide}: slide file not found; check heatmaps.slide_paths")
            )
            continue
        h5 = feature_dir / rel.with_suffix(".h5")
        flat = feature_dir / f"{rel.stem}.h5"
        if not h5.is_file() and stems[rel.stem] == 1 and flat.is_file():
            h5 = flat
        if not h5.is_file():
            plan.skipped.append(
                SkippedSlide(slide, f"{slide}: no features at {h5}; run preprocess on it with this wsi_dir")
            )
            continue
        check_input(h5, f"heatmaps.feature_dir: feature file {h5}")
        plan.jobs.append(
            HeatmapJob(slide, h5, out_dir / rel.parent / rel.stem, rel.with_suffix("").as_posix())
        )
    return plan
