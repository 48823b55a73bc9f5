"""End to end: reuse follows provenance, and interrupted runs (SIGTERM, kill -9) leave nothing partial.

* crossval: flipping one patient's label recomputes the folds that hold that patient — the fold
  where it is tested keeps its checkpoint (its training data did not change) and predicts again
  with the new label; a table change that no used target sees recomputes nothing.
* preprocess: a slide overwritten with other bytes that keeps its size and mtime is recomputed.
* SIGTERM / kill -9 in the middle of a stage (the ``stamp`` CLI in a subprocess): SIGTERM exits
  within 10 s with no temp file left; the rerun sweeps what kill -9 left and gives byte-identical
  outputs to an uninterrupted run. preprocess and crossval run here; the other stages in the slow tier.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from stamp.provenance import FOLDER_RECORD, read_record
from stamp.synthetic import SlideSpec, write_cohort, write_slide
from tests.conftest import REPO_ROOT, leftover_temps
from tests.test_modeling_train import LABEL, write_tiny_cohort

pytestmark = pytest.mark.usefixtures("prefect_api")


# ------------------------------------------------------------------------------------------ crossval


def _crossval_section(root: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "output_dir": str(out),
        "clini_table": str(root / "clini.csv"),
        "slide_table": str(root / "slide.csv"),
        "feature_dir": str(root / "features"),
        "ground_truth_label": LABEL,
        "categories": ["MSIH", "nonMSIH"],
        "n_splits": 3,
        **extra,
    }


def _advanced(**extra: Any) -> dict[str, Any]:
    return {"model_name": "abmil", "max_epochs": 2, "batch_size": 4, "seed": 0, **extra}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e-tiny")
    write_tiny_cohort(root, n_patients=24, dim=16)
    return root


def _fold_state(out: Path) -> dict[int, dict[str, Any]]:
    state = {}
    for i in range(3):
        fold = out / f"split-{i}"
        record = read_record(fold / FOLDER_RECORD)
        assert record is not None, f"{fold} has no provenance record"
        state[i] = {"ckpt": (fold / "model.ckpt").read_bytes(), "record": record.key}
    return state


def test_crossval_label_flip_recomputes_exactly_the_folds_holding_that_patient(
    tiny_root: Path, tmp_path: Path, one_torch_thread: None, stamp_log: pytest.LogCaptureFixture
) -> None:
    from stamp_flows.modeling import crossval_flow

    root = tmp_path / "cohort"
    shutil.copytree(tiny_root, root)
    out = tmp_path / "cv"
    section, advanced = _crossval_section(root, out), _advanced()
    crossval_flow(section=section, advanced=advanced)
    before = _fold_state(out)
    splits = pd.read_json(out / "splits.json")["splits"]
    patient = splits[1]["test_patients"][0]

    # a table column no target uses: nothing is recomputed (the task re-runs, the folds are reused)
    clini = pd.read_csv(root / "clini.csv")
    clini.loc[clini["PATIENT"] == patient, "grade"] = "G9"
    clini.to_csv(root / "clini.csv", index=False)
    stamp_log.clear()
    crossval_flow(section=section, advanced=advanced)
    assert _fold_state(out) == before
    assert stamp_log.text.count("finished with the same provenance; reusing it") == 3
    assert "training" not in stamp_log.text.replace("training data", "")

    # flip the label: every fold holds the patient (in fold 1's test set, in the others' training sets)
    old = clini.loc[clini["PATIENT"] == patient, LABEL].item()
    new = "nonMSIH" if old == "MSIH" else "MSIH"
    clini.loc[clini["PATIENT"] == patient, LABEL] = new
    clini.to_csv(root / "clini.csv", index=False)
    stamp_log.clear()
    result = crossval_flow(section=section, advanced=advanced)
    after = _fold_state(out)
    assert all(after[i]["record"] != before[i]["record"] for i in range(3)), "every fold holds the patient"
    assert after[1]["ckpt"] == before[1]["ckpt"], "fold 1 tests the patient: its model is kept"
    assert "split-1: its training data did not change; reusing" in stamp_log.text
    for i in (0, 2):
        assert f"split-{i}: computing again (changed settings.targets.{patient})" in stamp_log.text
    preds = pd.read_csv(out / "split-1" / "patient-preds.csv", dtype=str)
    assert preds.loc[preds["PATIENT"] == patient, LABEL].item() == new
    assert len(result["folds"]) == 3


def test_changed_n_splits_is_an_error_that_says_what_to_do(tiny_root: Path, tmp_path: Path) -> None:
    from stamp.config_models import CrossvalConfig
    from stamp.modeling.crossval import prepare_splits
    from stamp.modeling.stage import training_cohort

    sec = CrossvalConfig.model_validate(_crossval_section(tiny_root, tmp_path / "cv"))
    cohort = training_cohort(sec)
    prepare_splits(cohort, tmp_path / "cv", 3, 0)
    with pytest.raises(ValueError, match=r"has 3 folds but crossval.n_splits is 5; set n_splits to 3"):
        prepare_splits(cohort, tmp_path / "cv", 5, 0)


# ----------------------------------------------------------------------------------------- preprocess


def _pad(path: Path, size: int) -> None:
    with open(path, "ab") as fh:  # TIFF readers ignore bytes after the last IFD's data
        fh.write(b"\0" * (size - path.stat().st_size))


def test_preprocess_detects_a_rewrite_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    from stamp.config_models import PreprocessingConfig
    from stamp.features import read_features
    from stamp.hashing import file_sha256
    from stamp_flows.preprocess import run_preprocess

    wsi = tmp_path / "wsi"
    a, b = wsi / "a.svs", tmp_path / "b.svs"
    write_slide(a, SlideSpec(width=2048, height=1792, mpp=0.5, planted_fraction=0.0, seed=1))
    write_slide(b, SlideSpec(width=2048, height=1792, mpp=0.5, planted_fraction=0.3, seed=2))
    size = max(a.stat().st_size, b.stat().st_size) + 16
    _pad(a, size)
    _pad(b, size)
    cfg = PreprocessingConfig(output_dir=tmp_path / "out", wsi_dir=wsi, extractor="demo", max_workers=1)
    first = run_preprocess(cfg, task_concurrency=1)
    assert first["counts"]["done"] == 1
    h5 = Path(first["feature_dir"]) / "a.h5"
    before = read_features(h5)

    st = a.stat()
    a.write_bytes(b.read_bytes())  # what `cp -p` / a restore from backup does
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = run_preprocess(cfg, task_concurrency=1)
    assert second["counts"] == {"done": 1, "cached": 0, "skipped": 0, "failed": 0}
    after = read_features(h5)
    assert after.attrs["slide_sha256"] == file_sha256(b) != before.attrs["slide_sha256"]
    assert not (len(after.feats) == len(before.feats) and (after.feats == before.feats).all())


# ---------------------------------------------------------------------------------- interrupted runs


def _env(tmp_path: Path, api: str, results: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / results),  # separate caches: real work
        "PYTHONPATH": str(REPO_ROOT),
    }


def _stamp(cfg: Path, stage: str, env: dict[str, str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "stamp.cli", "-c", str(cfg), stage]
    return subprocess.Popen(
        cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _interrupt(proc: subprocess.Popen[str], ready: Callable[[], bool], sig: int) -> tuple[int, float, str]:
    """Send ``sig`` once ``ready()``; return (exit status, seconds from signal to exit, output)."""
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be interrupted:\n" + proc.communicate()[0][-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the point to interrupt")
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not stop within 60 s of the signal")
    return proc.returncode, time.monotonic() - t0, out


def _staging(folder: Path, pattern: str) -> Callable[[], bool]:
    return lambda: any(folder.glob(pattern)) if folder.is_dir() else False


def _assert_stopped(sig: int, rc: int, seconds: float, out: str, root: Path) -> None:
    if sig == signal.SIGTERM:
        assert rc == 130 and seconds < 10, (rc, seconds, out[-3000:])
        assert "interrupted (SIGTERM)" in out
        assert not leftover_temps(root), "SIGTERM must leave no temp file"
    else:
        assert rc == -signal.SIGKILL


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e-slides")
    write_cohort(root, n_patients=5, seed=21, size=2560, variants=False)
    return root / "slides"


@pytest.fixture(scope="module")
def reference_features(slides: Path, tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """An uninterrupted preprocess run (its own result store: nothing comes from another test's cache)."""
    tmp = tmp_path_factory.mktemp("e2e-ref")
    cfg = _write(tmp / "config.yaml", {"preprocessing": _pre_section(slides, tmp / "out")})
    _finish(_stamp(cfg, "preprocess", _env(tmp, prefect_api, "results")))
    (feat_dir,) = (p for p in (tmp / "out").iterdir() if p.is_dir())
    return feat_dir


def _pre_section(slides: Path, out: Path) -> dict[str, Any]:
    return {"output_dir": str(out), "wsi_dir": str(slides), "extractor": "demo", "max_workers": 1,
            "tile_size_um": 128.0}  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_preprocess_interrupted_then_rerun_equals_an_uninterrupted_run(
    sig: int, slides: Path, reference_features: Path, tmp_path: Path, prefect_api: str
) -> None:
    out = tmp_path / "out"
    cfg = _write(tmp_path / "config.yaml", {"preprocessing": _pre_section(slides, out)})
    env = _env(tmp_path, prefect_api, "results")
    feat_dir = out / reference_features.name
    proc = _stamp(cfg, "preprocess", env)
    rc, seconds, text = _interrupt(proc, lambda: len(list(feat_dir.glob("*.h5"))) >= 1, sig)
    _assert_stopped(sig, rc, seconds, text, out)
    assert len(list(feat_dir.glob("*.h5"))) < len(list(slides.glob("*.svs"))), "stopped in the middle"
    _finish(_stamp(cfg, "preprocess", env))
    assert not leftover_temps(out) and not list(out.rglob("*.lock"))
    reference = sorted(p.name for p in reference_features.glob("*.h5"))
    assert sorted(p.name for p in feat_dir.glob("*.h5")) == reference
    for name in reference:
        assert (feat_dir / name).read_bytes() == (reference_features / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference_crossval(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    tmp = tmp_path_factory.mktemp("e2e-cv-ref")
    cfg = _write(tmp / "config.yaml", _crossval_config(tiny_root, tmp / "cv"))
    _finish(_stamp(cfg, "crossval", _env(tmp, prefect_api, "results")))
    return tmp / "cv"


def _crossval_config(root: Path, out: Path) -> dict[str, Any]:
    return {
        "crossval": _crossval_section(root, out),
        "advanced_config": _advanced(model_name="vit", max_epochs=10),
    }


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_crossval_interrupted_mid_fold_then_rerun_equals_an_uninterrupted_run(
    sig: int, tiny_root: Path, reference_crossval: Path, tmp_path: Path, prefect_api: str
) -> None:
    out = tmp_path / "cv"
    cfg = _write(tmp_path / "config.yaml", _crossval_config(tiny_root, out))
    env = _env(tmp_path, prefect_api, "results")
    proc = _stamp(cfg, "crossval", env)
    rc, seconds, text = _interrupt(proc, _staging(out, ".split-1.stamp-tmp-*"), sig)
    _assert_stopped(sig, rc, seconds, text, out)
    assert not (out / "split-1").exists() and not (out / "split-2").exists(), "no partial fold published"
    rerun = _finish(_stamp(cfg, "crossval", env))
    if sig == signal.SIGKILL:
        assert "temp file(s) left by an interrupted run" in rerun
    assert not leftover_temps(out)
    for i in range(3):
        for name in ("patient-preds.csv", "model.ckpt"):
            ref = reference_crossval / f"split-{i}" / name
            assert (out / f"split-{i}" / name).read_bytes() == ref.read_bytes(), f"split-{i}/{name}"
