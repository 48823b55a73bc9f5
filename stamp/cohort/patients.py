"""Clinical + slide tables → patients with their feature files and targets (stamp-facts §3.3–3.4).

STAMP's rules, with its bugs fixed (stamp-facts §7): slides are grouped per patient whatever the row
order; ``FILENAME`` may omit ``.h5`` (STAMP issues #21/#95); every dropped patient is counted under
one reason, warned about per reason, and the log ends with the totals. Patient-level features are
``<PATIENT>.h5`` directly in ``feature_dir`` (no slide table needed); tile and slide features need
the slide table. Tables are read as text; the tokens in :data:`stamp.cohort.tables.NA_TOKENS` mean
"missing".
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stamp.cohort.feature_files import (
    FeatureType,
    feature_info,
    feature_path,
    feature_type_of_scan,
    probe_feature_file,
    scan_feature_dir,
)
from stamp.cohort.tables import cell_text, parse_status, read_table

logger = logging.getLogger("stamp")

Task = Literal["classification", "regression", "survival"]
MIN_CLASS_PATIENTS = 16  # STAMP warns below this many patients per class

# Reasons a patient is dropped. Those in _MISSING obey drop_patients_with_missing_ground_truth;
# the label problems after them drop only when targets are required (training).
NOT_IN_CLINI = "not in clinical table"
NO_SLIDES = "no slides in slide table"
NO_FEATURES = "no feature files"
UNREADABLE = "unreadable feature files"
EMPTY = "feature files without tiles"
MISSING_GT = "missing ground truth"
ALL_MISSING = "all targets missing"
MISSING_TIME = "missing survival time"
MISSING_STATUS = "missing survival status"
NON_NUMERIC = "non-numeric ground truth"
BAD_TIME = "invalid survival time"
BAD_STATUS = "unrecognised survival status"
NOT_IN_CATEGORIES = "label not in categories"
_MISSING = frozenset({NOT_IN_CLINI, MISSING_GT, ALL_MISSING, MISSING_TIME, MISSING_STATUS})


@dataclass(frozen=True)
class Patient:
    """One usable patient: sorted absolute feature files and the parsed target (None = unknown)."""

    id: str
    feature_files: tuple[Path, ...]
    target: Any  # str | dict[str, str | None] | float | tuple[float, float] (time, event) | None


@dataclass
class CohortData:
    """The patients of a cohort and how their targets were read."""

    task: Task
    feature_type: FeatureType
    patients: list[Patient]
    targets: list[str]
    categories: dict[str, list[str]]
    dropped: dict[str, list[str]]
    feature_info: dict[str, Any] = field(default_factory=dict)  # extractor, dim, weights_sha256, ...

    @property
    def multi_target(self) -> bool:
        return self.task == "classification" and len(self.targets) > 1

    def with_targets(self) -> list[Patient]:
        """Patients with a known target (``drop_patients_with_missing_ground_truth: false`` keeps others)."""
        return [p for p in self.patients if p.target is not None]


# ------------------------------------------------------------------------------------------- tables
def _slide_files(
    slide_table: Path, feature_dir: Path, patient_label: str, filename_label: str
) -> dict[str, list[Path]]:
    """Patient → feature files from the slide table, whatever the row order."""
    df = read_table(slide_table, [patient_label, filename_label], what="slide table")
    files: dict[str, list[Path]] = defaultdict(list)
    owner: dict[Path, tuple[str, str]] = {}
    skipped = 0
    for pid_raw, name_raw in zip(df[patient_label], df[filename_label], strict=True):
        pid, name = cell_text(pid_raw), cell_text(name_raw)
        if pid is None or name is None:
            skipped += 1
            continue
        path = feature_path(feature_dir, name)
        if path in owner:
            raise ValueError(
                f"{slide_table}: {filename_label} {name!r} (patient {pid}) is the same feature file as "
                f"{owner[path][1]!r} (patient {owner[path][0]}); each file may appear only once"
            )
        owner[path] = (pid, name)
        files[pid].append(path)
    if skipped:
        logger.warning(
            "%s: %d row(s) without %s or %s ignored", slide_table, skipped, patient_label, filename_label
        )
    return dict(files)


def _clini_rows(
    clini_table: Path, patient_label: str, columns: Sequence[str]
) -> dict[str, dict[str, str | None]]:
    df = read_table(clini_table, [patient_label, *columns], what="clinical table")
    rows: dict[str, dict[str, str | None]] = {}
    dups: dict[str, int] = defaultdict(lambda: 1)
    for record in df.to_dict("records"):
        pid = cell_text(record[patient_label])
        if pid is None:
            continue
        if pid in rows:
            dups[pid] += 1
        rows[pid] = {c: cell_text(record[c]) for c in columns}
    if dups:
        named = ", ".join(f"{p!r} ({n} rows)" for p, n in sorted(dups.items())[:5])
        raise ValueError(
            f"{clini_table}: duplicate patient {named} in column {patient_label!r}; "
            "each patient needs exactly one row in the clinical table"
        )
    return rows


# ------------------------------------------------------------------------------------------ targets
def _target_columns(
    task: Task,
    gt: str | list[str] | None,
    time_label: str | None,
    status_label: str | None,
    require: bool,
) -> list[str]:
    if task == "survival":
        if time_label and status_label:
            return [time_label, status_label]
        if require:
            raise ValueError("survival needs time_label and status_label (the clinical table's columns)")
        return []
    if task not in ("classification", "regression"):
        raise ValueError(f"unknown task {task!r}; use classification, regression or survival")
    labels = [gt] if isinstance(gt, str) else list(gt or [])
    if not labels and require:
        raise ValueError(f"{task} needs ground_truth_label (the clinical table's target column)")
    if len(labels) > 1 and task != "classification":
        raise ValueError(
            f"several ground_truth_label columns (multi-target) work for classification only, not {task}"
        )
    return labels


def _parse_target(
    task: Task, targets: Sequence[str], row: Mapping[str, str | None]
) -> tuple[Any, str | None]:
    """(target, None) or (None, reason); multi-target values missing per target stay None."""
    if not targets:
        return None, None
    if task == "survival":
        time_raw, status_raw = row.get(targets[0]), row.get(targets[1])
        if time_raw is None:
            return None, MISSING_TIME
        try:
            time = float(time_raw)
        except ValueError:
            return None, BAD_TIME
        if not math.isfinite(time) or time < 0:
            return None, BAD_TIME
        if status_raw is None:
            return None, MISSING_STATUS
        event = parse_status(status_raw)
        return (None, BAD_STATUS) if math.isnan(event) else ((time, event), None)
    if len(targets) > 1:
        values = {t: row.get(t) for t in targets}
        return (None, ALL_MISSING) if all(v is None for v in values.values()) else (values, None)
    value = row.get(targets[0])
    if value is None:
        return None, MISSING_GT
    if task == "regression":
        try:
            number = float(value)
        except ValueError:
            return None, NON_NUMERIC
        return (number, None) if math.isfinite(number) else (None, NON_NUMERIC)
    return value, None


def _examples(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (", …" if len(ids) > n else "")


# ------------------------------------------------------------------------------------------- cohort
def load_cohort(
    *,
    task: Task,
    clini_table: Path | None,
    slide_table: Path | None,
    feature_dir: Path,
    ground_truth_label: str | list[str] | None,
    categories: list[str] | Mapping[str, list[str]] | None = None,
    time_label: str | None = None,
    status_label: str | None = None,
    patient_label: str = "PATIENT",
    filename_label: str = "FILENAME",
    drop_patients_with_missing_ground_truth: bool = True,
    require_targets: bool = True,
) -> CohortData:
    """Usable patients of a cohort (see module docstring); ``require_targets=False`` for deploy."""
    feature_dir = Path(os.path.abspath(feature_dir))
    targets = _target_columns(task, ground_truth_label, time_label, status_label, require_targets)
    if clini_table is None and require_targets:
        raise ValueError(f"{task} training needs clini_table (the clinical table with the targets)")
    scan = scan_feature_dir(feature_dir)
    feature_type = feature_type_of_scan(scan, feature_dir)
    logger.info("%s: %s features (%d h5 files)", feature_dir, feature_type, len(scan))
    if feature_type == "patient":
        files = {p.stem: [p] for p in scan if p.parent == feature_dir}
        no_source = f"no <{patient_label}>.h5 in feature_dir"
    elif slide_table is None:
        raise ValueError(
            f"{feature_dir}: {feature_type} features need slide_table ({patient_label} → {filename_label})"
        )
    else:
        files = _slide_files(Path(slide_table), feature_dir, patient_label, filename_label)
        no_source = NO_SLIDES
    rows = _clini_rows(Path(clini_table), patient_label, targets) if clini_table is not None else None
    drop_missing = drop_patients_with_missing_ground_truth
    dropped: dict[str, list[str]] = defaultdict(list)
    unlabelled: dict[str, list[str]] = defaultdict(list)
    kept: list[tuple[str, tuple[Path, ...], Any]] = []
    missing_slides: list[Path] = []

    def reject(pid: str, reason: str) -> bool:
        """Drop ``pid`` for ``reason`` (True) or note that it is kept without a target (False)."""
        drop = drop_missing if reason in _MISSING else require_targets
        (dropped if drop else unlabelled)[reason].append(pid)
        return drop

    for pid in sorted(set(rows or ()) | set(files)):
        if pid not in files:
            dropped[no_source].append(pid)
            continue
        known = rows is None or pid in rows
        if not known and reject(pid, NOT_IN_CLINI):
            continue
        present = [f for f in files[pid] if f in scan or f.is_file()]
        missing_slides += [f for f in files[pid] if f not in present]
        probes = {f: scan.get(f) or probe_feature_file(f) for f in present}
        readable = [f for f in present if probes[f].feat_type is not None]
        usable = tuple(sorted(f for f in readable if probes[f].n > 0))
        if not usable:
            dropped[NO_FEATURES if not present else UNREADABLE if not readable else EMPTY].append(pid)
            continue
        target, reason = _parse_target(task, targets if known and rows else [], (rows or {}).get(pid, {}))
        if reason is not None and reject(pid, reason):
            continue
        kept.append((pid, usable, target))
    if missing_slides:
        logger.warning(
            "%d slide(s) of the slide table have no feature file under %s (e.g. %s)",
            len(missing_slides), feature_dir, _examples([str(f) for f in missing_slides], 3),
        )  # fmt: skip

    cats: dict[str, list[str]] = {}
    if task == "classification" and targets:
        kept, cats = _apply_categories(kept, targets, categories, reject, require_targets)

    for reason, ids in dropped.items():
        logger.warning("%d patient(s) dropped: %s (%s)", len(ids), reason, _examples(ids))
    for reason, ids in unlabelled.items():
        logger.warning("%d patient(s) kept without a target: %s (%s)", len(ids), reason, _examples(ids))
    patients = [Patient(pid, fs, t) for pid, fs, t in kept]
    n_total = len(set(rows or ()) | set(files))
    logger.info(
        "Total patients: %d (clinical table: %s, with features/slides: %d) / usable: %d (dropped: %d)",
        n_total, "-" if rows is None else len(rows), len(files), len(patients), n_total - len(patients),
    )  # fmt: skip
    if not patients:
        reasons = "; ".join(f"{r}: {len(ids)}" for r, ids in dropped.items()) or "no patients found"
        raise ValueError(f"no usable patients in {feature_dir} ({reasons}); check the tables and feature_dir")
    return CohortData(
        task=task,
        feature_type=feature_type,
        patients=patients,
        targets=targets,
        categories=cats,
        dropped={r: sorted(ids) for r, ids in dropped.items()},
        feature_info=feature_info([f for p in patients for f in p.feature_files], scan),
    )


def _apply_categories(
    kept: list[tuple[str, tuple[Path, ...], Any]],
    targets: list[str],
    categories: list[str] | Mapping[str, list[str]] | None,
    reject: Callable[[str, str], bool],
    require: bool,
) -> tuple[list[tuple[str, tuple[Path, ...], Any]], dict[str, list[str]]]:
    """Given (or sorted unique) classes per target; labels outside them are dropped / set to None."""
    multi = len(targets) > 1

    def values(target: Any) -> dict[str, str | None]:
        return target if multi else {targets[0]: target}

    cats: dict[str, list[str]] = {}
    for t in targets:
        given = categories.get(t) if isinstance(categories, Mapping) else categories
        found = {values(tgt)[t] for _, _, tgt in kept if tgt is not None} - {None}
        cats[t] = [str(c) for c in given] if given is not None else sorted(str(v) for v in found)
    out: list[tuple[str, tuple[Path, ...], Any]] = []
    outside: Counter[str] = Counter()
    for pid, fs, tgt in kept:
        if tgt is not None:
            vals = values(tgt)
            outside.update(t for t, v in vals.items() if v is not None and v not in cats[t])
            vals = {t: v if v in cats[t] else None for t, v in vals.items()}
            if all(v is None for v in vals.values()):
                if reject(pid, ALL_MISSING if multi else NOT_IN_CATEGORIES):
                    continue
                tgt = None
            else:
                tgt = vals if multi else vals[targets[0]]
        out.append((pid, fs, tgt))
    for t in targets:
        if multi and outside[t]:
            logger.warning(
                "%s: %d label(s) outside the categories %s treated as missing", t, outside[t], cats[t]
            )
        found_n = Counter(values(tgt)[t] for _, _, tgt in out if tgt is not None)
        counts = {c: found_n[c] for c in cats[t]}
        present = [c for c, n in counts.items() if n]
        if require and len(present) < 2:
            raise ValueError(
                f"{t}: classification needs at least 2 classes, found {len(present)} "
                f"({', '.join(map(repr, present)) or 'none'}) among the usable patients; "
                "check ground_truth_label and categories"
            )
        small = ", ".join(f"{c} ({n})" for c, n in counts.items() if n < MIN_CLASS_PATIENTS)
        if small:
            logger.warning(
                "%s: class(es) with fewer than %d patients: %s; results will be unreliable",
                t,
                MIN_CLASS_PATIENTS,
                small,
            )
    return out, cats
