"""A synthetic cohort: slides, STAMP clinical and slide tables, a truth manifest and broken variants.

Layout of ``write_cohort(out)``::

    out/slides/P001_s1.svs (+ truth sidecars)   aperio, mpp 0.25 or 0.5; use as ``wsi_dir``
    out/clini.csv     PATIENT, isMSIH (MSIH/nonMSIH), TMB, OS_time (days), OS_event (1/0)
    out/slide.csv     PATIENT, FILENAME
    out/truth.json    per slide/patient truth (planted fraction, mpp, label, sidecar paths)
    out/extras/       only with ``variants=True``; never under ``slides/``:
        generic_no_mpp.tif   generic tiled TIFF, no resolution tags -> needs ``default_slide_mpp``
        truncated.svs        a valid Aperio file cut to half its bytes
        not_a_slide.svs      text with a slide suffix -> OpenSlideUnsupportedFormatError
        blank.svs            valid Aperio slide, all glass, no tissue
        corrupt_tiles.svs    valid Aperio structure, the middle third of level-0 tiles zeroed:
                             opens, lower levels read, level-0 reads there -> OpenSlideError

``FILENAME`` follows STAMP: the feature file path relative to the feature
directory, ending in ``.h5``. Preprocessing mirrors paths relative to
``wsi_dir``; with ``wsi_dir = out/slides`` that is ``<slide stem>.h5``.

Outcome model (patient level, ``pf`` = tissue-weighted planted fraction of the
patient's slides, 0 for negatives; positives have 0.10-0.40 per slide):
``TMB = 4 + 80 pf + N(0, 2.5)`` (>= 0.5); ``OS_time = 365 exp(0.2 + 4.5 pf + N(0, 0.35))``
days (more biomarker, longer survival, as for MSI-H); ``OS_event`` = 1 with
probability 0.75, independent of ``pf``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stamp.provenance import Check, Provenance, check_files, record_files
from stamp.synthetic.extras import EXTRA_EXPECT, write_extras
from stamp.synthetic.slide import TRUTH_FORMAT_VERSION, SlideSpec, SlideTruth, slide_seed, write_slide

DEFAULT_SIZE = 4096
DEFAULT_PATIENTS = 12
LABEL_COLUMN = "isMSIH"
POSITIVE, NEGATIVE = "MSIH", "nonMSIH"
CLINI_COLUMNS = ("PATIENT", LABEL_COLUMN, "TMB", "OS_time", "OS_event")
_OWNED = ("slides", "extras", "clini.csv", "slide.csv", "truth.json")


@dataclass(frozen=True)
class SlideRecord:
    """One cohort slide: its patient, label and ground truth."""

    patient: str
    label: str
    truth: SlideTruth

    @property
    def filename(self) -> str:
        """The slide table's FILENAME: ``<stem>.h5``."""
        return f"{self.truth.slide_path.stem}.h5"


@dataclass
class CohortInfo:
    """What :func:`write_cohort` wrote. ``patients`` rows hold the clinical values plus ``planted_fraction``."""

    root: Path
    seed: int
    size: int
    slides: list[SlideRecord]
    patients: list[dict[str, Any]]
    extras: dict[str, SlideTruth | Path] = field(default_factory=dict)

    @property
    def slides_dir(self) -> Path:
        """The folder to use as ``wsi_dir``."""
        return self.root / "slides"

    @property
    def clini_table(self) -> Path:
        """``clini.csv``."""
        return self.root / "clini.csv"

    @property
    def slide_table(self) -> Path:
        """``slide.csv``."""
        return self.root / "slide.csv"

    @property
    def truth_json(self) -> Path:
        """``truth.json``."""
        return self.root / "truth.json"

    @property
    def summary(self) -> str:
        """A few human-readable lines about the cohort."""
        n_pos = sum(p[LABEL_COLUMN] == POSITIVE for p in self.patients)
        mpps = sorted({r.truth.mpp for r in self.slides if r.truth.mpp is not None})
        lines = [
            f"synthetic cohort in {self.root}: {len(self.patients)} patients ({n_pos} {POSITIVE},"
            f" {len(self.patients) - n_pos} {NEGATIVE}), {len(self.slides)} slides, seed {self.seed}",
            f"  slides: {self.slides_dir} (level 0 up to {self.size} px, mpp {', '.join(f'{m:g}' for m in mpps)})",
            f"  tables: {self.clini_table.name} (label {LABEL_COLUMN}, TMB, OS_time/OS_event), {self.slide_table.name}",
            f"  truth:  {self.truth_json.name} + per-slide .tissue/.biomarker .geojson/.png",
        ]
        if self.extras:
            lines.append(f"  extras: {self.root / 'extras'} ({', '.join(sorted(self.extras))})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The ``truth.json`` content (paths relative to ``root``)."""
        extras: dict[str, Any] = {}
        for name, item in self.extras.items():
            if isinstance(item, SlideTruth):
                extras[name] = {"kind": "slide", **item.to_dict(relative_to=self.root)}
            else:
                extras[name] = {"kind": "file", "path": item.relative_to(self.root).as_posix()}
            extras[name]["expect"] = EXTRA_EXPECT[name]
        return {
            "generator": "stamp.synthetic",
            "format_version": TRUTH_FORMAT_VERSION,
            "seed": self.seed,
            "size": self.size,
            "label": {"column": LABEL_COLUMN, "positive": POSITIVE, "negative": NEGATIVE},
            "filename_convention": "slide.csv FILENAME = <slide stem>.h5 (feature dir of a run with wsi_dir=slides/)",
            "patients": self.patients,
            "slides": [
                {"patient": r.patient, "label": r.label, "filename": r.filename, **r.truth.to_dict(self.root)}
                for r in self.slides
            ],
            "extras": extras,
        }


def load_cohort_truth(root: Path) -> CohortInfo:
    """Read a cohort written by :func:`write_cohort` back from its ``truth.json``: its slides, patients
    and where the biomarker was planted (the training cohort of feature files and targets is
    :func:`stamp.cohort.load_cohort`)."""
    root = Path(root)
    d = json.loads((root / "truth.json").read_text())
    slides = [SlideRecord(s["patient"], s["label"], SlideTruth.from_dict(s, root)) for s in d["slides"]]
    extras: dict[str, SlideTruth | Path] = {
        name: SlideTruth.from_dict(e, root) if e["kind"] == "slide" else root / e["path"]
        for name, e in d["extras"].items()
    }
    return CohortInfo(root, int(d["seed"]), int(d["size"]), slides, d["patients"], extras)


def _csv_bytes(rows: list[list[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _plan(n_patients: int, seed: int, size: int, mpps: tuple[float, ...]) -> list[dict[str, Any]]:
    """Per patient: id, label, and per slide (stem, SlideSpec). Pure function of the arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407]))
    width = max(3, len(str(n_patients)))
    n_pos = n_patients // 2 + (n_patients % 2) * int(rng.integers(0, 2))
    labels = np.array([POSITIVE] * n_pos + [NEGATIVE] * (n_patients - n_pos))
    rng.shuffle(labels)
    two = np.zeros(n_patients, bool)
    for lab in (POSITIVE, NEGATIVE):  # about a third of each class gets a second slide
        idx = np.flatnonzero(labels == lab)
        if len(idx) >= 2:
            two[rng.choice(idx, size=max(1, round(len(idx) / 3)), replace=False)] = True
    n_slides = int(n_patients + two.sum())
    mpp_list = np.resize(np.asarray(mpps, float), n_slides)
    rng.shuffle(mpp_list)
    plan, k = [], 0
    for i in range(n_patients):
        pid = f"P{i + 1:0{width}d}"
        slides = []
        for j in range(2 if two[i] else 1):
            short = round(size * rng.uniform(0.72, 0.95))
            w, h = (size, short) if rng.random() < 0.5 else (short, size)
            pf = float(rng.uniform(0.10, 0.40)) if labels[i] == POSITIVE else 0.0
            spec = SlideSpec(
                width=w,
                height=h,
                mpp=float(mpp_list[k]),
                planted_fraction=pf,
                seed=slide_seed(seed, k),
                texture_seed=int(seed),
            )
            slides.append((f"{pid}_s{j + 1}", spec))
            k += 1
        plan.append({"patient": pid, "label": str(labels[i]), "slides": slides})
    return plan


def _outcomes(rng: np.random.Generator, pf: float) -> dict[str, Any]:
    tmb = max(0.5, 4.0 + 80.0 * pf + rng.normal(0.0, 2.5))
    os_time = 365.0 * math.exp(0.2 + 4.5 * pf + rng.normal(0.0, 0.35))
    return {"TMB": round(tmb, 1), "OS_time": int(round(os_time)), "OS_event": int(rng.random() < 0.75)}


def _is_synthetic(truth_json: Path) -> bool:
    try:
        return json.loads(truth_json.read_text()).get("generator") == "stamp.synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def _install(build: Path, out: Path) -> None:
    """Move the built items into ``out``, replacing a previous synthetic cohort's items."""
    existing = [name for name in _OWNED if (out / name).exists()]
    if existing and not _is_synthetic(out / "truth.json"):
        raise FileExistsError(
            f"{out} already holds {', '.join(existing)} not written by `stamp synth`; choose an empty --out"
        )
    trash = build / ".old"
    trash.mkdir()
    for name in _OWNED:
        if (out / name).exists():
            os.replace(out / name, trash / name)
    for name in _OWNED:
        if (build / name).exists():
            os.replace(build / name, out / name)
    shutil.rmtree(build)


COHORT_UNIT = "synthetic-cohort"


def generator_code_hash() -> str:
    """Code version of the generator: every module of the :mod:`stamp.synthetic` package."""
    from stamp.hashing import code_hash

    return code_hash(Path(__file__).parent.glob("*.py"))


def cohort_provenance(
    n_patients: int, seed: int, size: int, mpps: tuple[float, ...], variants: bool
) -> Provenance:
    """What a synthetic cohort is computed from: its arguments and the generator's code."""
    code = generator_code_hash()
    settings = {
        "n_patients": n_patients,
        "seed": seed,
        "size": size,
        "mpps": list(mpps),
        "variants": variants,
    }
    return Provenance(stage="synthetic-cohort", inputs={}, settings=settings, code=code)


def cohort_files(out: Path) -> list[str]:
    """The files of the cohort in ``out`` (relative paths), as they are on disk now."""
    names = []
    for item in _OWNED:
        path = Path(out) / item
        if path.is_file():
            names.append(item)
        elif path.is_dir():
            names += [p.relative_to(out).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
    return names


def check_cohort(
    out: Path,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    mpps: tuple[float, ...] = (0.25, 0.5),
    variants: bool = True,
) -> Check:
    """:class:`stamp.provenance.Check` of the cohort in ``out`` against these arguments."""
    expected = cohort_provenance(n_patients, seed, size, tuple(mpps), variants)
    return check_files(Path(out), COHORT_UNIT, cohort_files(Path(out)), expected)


def write_cohort(
    out: Path,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    mpps: tuple[float, ...] = (0.25, 0.5),
    variants: bool = True,
) -> CohortInfo:
    """Write a synthetic cohort under ``out`` (see the module docstring for the layout).

    Positives (``isMSIH == MSIH``, about half) have planted regions on every
    slide, negatives none; about a third of each class has two slides; slide
    mpps cycle through ``mpps``. ``size`` is the long side of level 0 (the other
    side is 72-95 % of it). The cohort is built in a hidden folder under ``out``
    and moved into place at the end, so an interrupted run leaves no partial
    ``slides/`` or tables; a previous synthetic cohort in ``out`` is replaced.
    Same arguments, same bytes.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if size < 256:
        raise ValueError(f"size must be >= 256 px, got {size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build = out / f".synth-build-{os.getpid()}"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    try:
        plan = _plan(n_patients, seed, size, tuple(mpps))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0C7C0]))
        records: list[SlideRecord] = []
        patients: list[dict[str, Any]] = []
        for p in plan:
            truths = [write_slide(build / "slides" / f"{stem}.svs", spec) for stem, spec in p["slides"]]
            records += [SlideRecord(p["patient"], p["label"], t) for t in truths]
            area = sum(t.tissue_fraction * t.width * t.height for t in truths)
            pf = sum(t.planted_fraction * t.tissue_fraction * t.width * t.height for t in truths) / max(
                area, 1.0
            )
            patients.append(
                {
                    "PATIENT": p["patient"],
                    LABEL_COLUMN: p["label"],
                    **_outcomes(rng, pf),
                    "planted_fraction": round(pf, 6),
                }
            )
        clini = [list(CLINI_COLUMNS)] + [[row[c] for c in CLINI_COLUMNS] for row in patients]
        (build / "clini.csv").write_bytes(_csv_bytes(clini))
        slide_rows = [["PATIENT", "FILENAME"]] + [[r.patient, r.filename] for r in records]
        (build / "slide.csv").write_bytes(_csv_bytes(slide_rows))
        extras = write_extras(build / "extras", seed, size) if variants else {}
        info = CohortInfo(build, int(seed), int(size), records, patients, extras)
        (build / "truth.json").write_text(json.dumps(info.to_dict(), indent=1) + "\n")
        _install(build, out)
        record_files(
            out,
            COHORT_UNIT,
            cohort_files(out),
            cohort_provenance(n_patients, seed, size, tuple(mpps), variants),
        )
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return load_cohort_truth(out)


def synth_command(
    out: Path, patients: int = DEFAULT_PATIENTS, seed: int = 0, size: int | None = None, variants: bool = True
) -> CohortInfo:
    """Entry point for ``stamp synth``: write the cohort and return its info (prints nothing)."""
    return write_cohort(
        Path(out), n_patients=patients, seed=seed, size=size or DEFAULT_SIZE, variants=variants
    )
