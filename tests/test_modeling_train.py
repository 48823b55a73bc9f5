"""Training: losses and metrics against hand/brute-force references, the one-cycle LR, every task
end to end on tiny synthetic features, and seed determinism.

The tiny-cohort writer here (:func:`write_tiny_cohort`) is also used by the crossval and deploy tests.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from stamp.cohort import CohortData, load_cohort
from stamp.config_models import AdvancedConfig
from stamp.features import write_embedding, write_tile_features
from stamp.modeling.checkpoint import META_KEYS, CheckpointError, load_checkpoint, load_meta
from stamp.modeling.crossval import make_splits, predict_patients, run_fold
from stamp.modeling.losses import (
    IGNORE_INDEX,
    class_weights,
    cox_partial_likelihood_loss,
    multi_target_cross_entropy,
    weighted_cross_entropy,
)
from stamp.modeling.metrics import auroc, concordance_index, pearson_r
from stamp.modeling.train import TRAINING_METRICS_NAME, inner_split, train_model

# tiny models on 2 shared cores: one intra-op thread is ~10x faster than spinning two
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ----------------------------------------------------------------------------------- tiny cohorts

LABEL = "isMSIH"
POS, NEG = "MSIH", "nonMSIH"
STAMP_ATTRS = {"stamp_version": "2.5.0", "extractor": "ctranspath", "unit": "um", "tile_size_um": 256.0,
               "tile_size_px": 224, "code_hash": "0123abcd", "feat_type": "tile"}  # fmt: skip


@dataclass
class Tiny:
    root: Path
    clini: Path
    slides: Path
    features: Path
    table: pd.DataFrame


def _grid(n: int, rng: np.random.Generator) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    cells = np.array([(x, y) for y in range(side) for x in range(side)], dtype=np.float32)[:n] * 256.0
    return cells[rng.permutation(n)]


def write_tiny_cohort(
    root: Path,
    *,
    n_patients: int = 32,
    dim: int = 16,
    seed: int = 0,
    level: str = "tile",
    stamp_layout: bool = False,
    label: str = LABEL,
    classes: tuple[str, str] = (POS, NEG),
) -> Tiny:
    """Tile (or slide/patient) features of ``n_patients``: positives have a share of tiles with a shifted mean.

    Clinical table: ``label`` (pos/neg), ``grade`` (G1/G2, some missing; follows a second signal),
    ``TMB`` (rises with the planted fraction), ``OS_time``/``OS_event`` (longer with the fraction).
    ``stamp_layout`` writes tile h5 files the way STAMP does (its attrs, unsorted tiles) with h5py.
    """
    rng = np.random.default_rng(seed)
    feat_dir = root / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    slide_rows: list[dict[str, str]] = []
    for i in range(n_patients):
        pid = f"P{i:03d}"
        positive = i % 2 == 0
        frac = float(rng.uniform(0.3, 0.6)) if positive else 0.0
        high_grade = i % 3 == 0
        tiles = []
        n_slides = 1 + (i % 4 == 1)
        for s in range(n_slides):
            n = int(rng.integers(20, 81))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            marked = rng.random(n) < frac
            x[marked, : dim // 2] += 2.0
            if high_grade:
                x[: n // 3, dim // 2 :] += 1.5
            tiles.append(x)
            if level == "tile":
                name = f"{pid}_s{s}.h5"
                coords = _grid(n, rng)
                if stamp_layout:
                    with h5py.File(feat_dir / name, "w") as h5:
                        h5["feats"] = x.astype(np.float16)
                        h5["coords"] = coords
                        h5.attrs.update(STAMP_ATTRS)
                else:
                    write_tile_features(
                        feat_dir / name, x, coords, extractor="demo", tile_size_um=256.0, tile_size_px=224,
                        code_hash="abcd1234", extra_attrs={"weights_sha256": "f" * 64},
                    )  # fmt: skip
                slide_rows.append({"PATIENT": pid, "FILENAME": name})
        if level == "slide":
            for s, x in enumerate(tiles):
                name = f"{pid}_s{s}.h5"
                write_embedding(
                    feat_dir / name, x.mean(0), feat_type="slide", encoder="demo-slide", code_hash="ab"
                )
                slide_rows.append({"PATIENT": pid, "FILENAME": name})
        elif level == "patient":
            allx = np.concatenate(tiles)
            write_embedding(
                feat_dir / f"{pid}.h5", allx.mean(0), feat_type="patient", encoder="demo-pat", code_hash="ab"
            )
        rows.append(
            {
                "PATIENT": pid,
                label: classes[0] if positive else classes[1],
                "grade": None if i % 7 == 3 else ("G2" if high_grade else "G1"),
                "TMB": 4 + 40 * frac + rng.normal(0, 1.0),
                "OS_time": 365 * math.exp(0.2 + 4.5 * frac + rng.normal(0, 0.2)),
                "OS_event": int(rng.random() < 0.8),
            }
        )
    # shuffled table rows: grouping must not depend on row order
    table = pd.DataFrame(rows)
    table.sample(frac=1, random_state=seed).to_csv(root / "clini.csv", index=False)
    slides = root / "slide.csv"
    pd.DataFrame(
        slide_rows or [{"PATIENT": str(r["PATIENT"]), "FILENAME": f"{r['PATIENT']}.h5"} for r in rows]
    ).sample(frac=1, random_state=seed).to_csv(slides, index=False)
    return Tiny(root, root / "clini.csv", slides, feat_dir, table)


def tiny_cohort(tiny: Tiny, task: str = "classification", label: Any = LABEL, **kw: Any) -> CohortData:
    if task == "survival":
        return load_cohort(task="survival", clini_table=tiny.clini, slide_table=tiny.slides, feature_dir=tiny.features,
                           ground_truth_label=None, time_label="OS_time", status_label="OS_event", **kw)  # fmt: skip
    return load_cohort(task=task, clini_table=tiny.clini, slide_table=tiny.slides, feature_dir=tiny.features,  # type: ignore[arg-type]
                       ground_truth_label=label, **kw)  # fmt: skip


def tiny_advanced(model_name: str | None = "vit", **kw: Any) -> AdvancedConfig:
    """Small, fast settings: tiny models, few epochs, no workers, fixed seed."""
    params = {
        "vit": {"dim_model": 16, "dim_feedforward": 32, "n_heads": 2, "n_layers": 1},
        "abmil": {"dim_hidden": 16},
        "mlp": {"dim_hidden": 16},
        "trans_mil": {"dim_hidden": 16},
        "barspoon": {"d_model": 16, "num_encoder_heads": 2, "num_decoder_heads": 2, "num_encoder_layers": 1,
                     "num_decoder_layers": 1, "dim_feedforward": 32, "learning_rate": 1e-3},
    }  # fmt: skip
    base: dict[str, Any] = dict(
        bag_size=32, batch_size=8, max_epochs=3, patience=16, num_workers=0, max_lr=1e-3, seed=0,
        accelerator="cpu", model_name=model_name, model_params=params,
    )  # fmt: skip
    base.update(kw)
    return AdvancedConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return write_tiny_cohort(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------------- losses


def test_class_weights_are_inverse_frequency_normalised() -> None:
    w = class_weights(["a", "a", "a", "b", None], ["a", "b"])
    np.testing.assert_allclose(w, np.array([4 / 3, 4 / 1]) / (4 / 3 + 4))
    assert w.sum() == pytest.approx(1.0)


def test_weighted_cross_entropy_equals_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5], [0.1, 0.3], [-1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([0, 1, 1, IGNORE_INDEX])
    w = torch.tensor([0.25, 0.75])
    logp = torch.log_softmax(logits, 1)
    nll = [-logp[0, 0], -logp[1, 1], -logp[2, 1]]
    ws = [0.25, 0.75, 0.75]
    hand = sum(wi * li for wi, li in zip(ws, nll, strict=True)) / sum(ws)
    assert float(weighted_cross_entropy(logits, target, w)) == pytest.approx(float(hand), rel=1e-6)
    # no label in the batch: 0 with a gradient path
    none = weighted_cross_entropy(logits.clone().requires_grad_(), torch.full((4,), IGNORE_INDEX), w)
    assert float(none.detach()) == 0.0
    none.backward()
    # multi-target = sum of targets
    y2 = torch.tensor([[0, 1], [1, IGNORE_INDEX], [1, 0], [IGNORE_INDEX, 0]])
    total = multi_target_cross_entropy([logits, logits.flip(1)], y2, [w, None])
    parts = weighted_cross_entropy(logits, y2[:, 0], w) + weighted_cross_entropy(
        logits.flip(1), y2[:, 1], None
    )
    assert float(total) == pytest.approx(float(parts))


def _cox_brute(eta: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> float:
    """Negative partial log-likelihood per event from the textbook formula, one tie group at a time."""
    total = 0.0
    for t in np.unique(time[event == 1]):
        group = np.flatnonzero((time == t) & (event == 1))
        risk_set = np.exp(eta[time >= t]).sum()
        tied = np.exp(eta[group]).sum()
        d = len(group)
        total += eta[group].sum()
        for k in range(d):
            total -= math.log(risk_set - (k / d if ties == "efron" else 0.0) * tied)
    return -total / event.sum()


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_loss_equals_brute_force_partial_likelihood(ties: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 12
        eta = rng.normal(size=n)
        time = rng.integers(1, 6, size=n).astype(float)  # many ties
        event = (rng.random(n) < 0.6).astype(float)
        event[0] = 1.0
        got = cox_partial_likelihood_loss(
            torch.tensor(eta),
            torch.tensor(time),
            torch.tensor(event),
            ties=ties,  # type: ignore[arg-type]
        )
        assert float(got) == pytest.approx(_cox_brute(eta, time, event, ties), rel=1e-9)
    no_events = cox_partial_likelihood_loss(torch.ones(3, requires_grad=True), torch.ones(3), torch.zeros(3))
    assert float(no_events.detach()) == 0.0
    no_events.backward()  # gradient path exists


def test_cox_loss_without_ties_is_the_same_for_both_methods() -> None:
    eta, time, event = torch.randn(9), torch.arange(9.0), torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 1, 1])
    a = cox_partial_likelihood_loss(eta, time, event, ties="efron")
    b = cox_partial_likelihood_loss(eta, time, event, ties="breslow")
    assert float(a) == pytest.approx(float(b))


# ----------------------------------------------------------------------------------- metrics


def _cindex_brute(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    num = den = 0.0
    for i, j in itertools.permutations(range(len(time)), 2):
        # i fails first: an event before j's time, or at the same time when j is censored
        if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
            den += 1
            num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_concordance_index_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 7, 40):
        time = rng.integers(1, 10, size=n).astype(float)
        risk = rng.integers(0, 5, size=n).astype(float)  # tied risks
        event = (rng.random(n) < 0.7).astype(float)
        event[0] = 1
        assert concordance_index(time, risk, event) == pytest.approx(_cindex_brute(time, risk, event))
    t = np.array([1.0, 2, 3, 4])
    assert concordance_index(t, -t, np.ones(4)) == 1.0  # shorter time, higher risk
    assert concordance_index(t, t, np.ones(4)) == 0.0
    assert math.isnan(concordance_index(t, t, np.zeros(4)))  # no events: undefined


def test_auroc_and_pearson() -> None:
    y = np.array([0, 0, 1, 1, -100])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.5, 0.5]])
    assert auroc(y, p) == 1.0
    assert math.isnan(auroc(np.zeros(3, int), np.full((3, 2), 0.5)))
    assert pearson_r(np.array([1.0, 2, 3, np.nan]), np.array([2.0, 4, 6, 1])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- checkpoints


def test_lightning_checkpoint_is_refused_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "stamp.ckpt"
    torch.save({"pytorch-lightning_version": "2.5.0", "state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match="Lightning"):
        load_meta(path)
    torch.save({"something": 1}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path / "other.ckpt")


# ----------------------------------------------------------------------------------- end to end


def _train(cohort: CohortData, out: Path, advanced: AdvancedConfig, **kw: Any) -> tuple[Path, dict[str, Any]]:
    train, valid = inner_split(cohort.patients, cohort, advanced.seed)
    path = train_model(train, valid, cohort, advanced=advanced, output_dir=out, seed=advanced.seed, **kw)
    return path, load_meta(path)


@pytest.mark.parametrize("model_name", ["vit", "abmil"])
def test_classification_trains_and_checkpoint_records_everything(
    tiny: Tiny, tmp_path: Path, model_name: str
) -> None:
    cohort = tiny_cohort(tiny)
    path, meta = _train(cohort, tmp_path, tiny_advanced(model_name))
    assert path == tmp_path / "model.ckpt" and (tmp_path / TRAINING_METRICS_NAME).is_file()
    assert set(META_KEYS) <= set(meta)
    assert meta["task"] == "classification" and meta["model_name"] == model_name
    assert meta["model_params"]["dim_hidden" if model_name == "abmil" else "dim_model"] == 16
    assert meta["dim_input"] == 16 and meta["n_outputs"] == 2 and meta["feature_type"] == "tile"
    assert meta["categories"] == {LABEL: [POS, NEG]} and meta["ground_truth_label"] == LABEL
    assert sum(meta["class_weights"][LABEL]) == pytest.approx(1.0)
    assert meta["extractor"] == "demo" and meta["weights_sha256"] == "f" * 64
    assert not set(meta["train_patients"]) & set(meta["valid_patients"])
    assert len(meta["train_patients"]) + len(meta["valid_patients"]) == 32
    assert meta["monitor"] == "valid_loss" and meta["survival_cut_off"] is None
    assert (
        len(meta["code_version"]) == 64
        and len(meta["config_hash"]) == 64
        and meta["stamp_version"] == "2.5.0"
    )
    model, meta2 = load_checkpoint(path)
    assert meta2 == meta and not model.training
    preds = predict_patients(path, cohort.patients[:5])
    assert list(preds.columns) == ["PATIENT", LABEL, "pred", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "loss"]
    np.testing.assert_allclose(preds[[f"{LABEL}_{POS}", f"{LABEL}_{NEG}"]].sum(axis=1), 1.0, rtol=1e-6)


def test_regression_trains_and_standardises_targets(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny, "regression", "TMB")
    path, meta = _train(cohort, tmp_path, tiny_advanced("abmil"))
    train_tmb = tiny.table.set_index("PATIENT").loc[meta["train_patients"], "TMB"]
    assert meta["target_mean"] == pytest.approx(train_tmb.mean()) and meta["monitor"] == "valid_loss"
    preds = predict_patients(path, cohort.patients)
    assert list(preds.columns) == ["PATIENT", "TMB", "pred", "loss"]
    np.testing.assert_allclose(preds["loss"], (preds["pred"] - preds["TMB"]).abs())
    assert preds["loss"].is_monotonic_increasing


def test_survival_trains_with_cindex_and_stores_the_training_median_risk(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny, "survival")
    path, meta = _train(cohort, tmp_path, tiny_advanced("vit"))
    assert meta["monitor"] == "valid_cindex" and meta["time_label"] == "OS_time"
    train = [p for p in cohort.patients if p.id in set(meta["train_patients"])]
    risks = predict_patients(path, train)["pred_score"]
    assert meta["survival_cut_off"] == pytest.approx(float(np.median(risks)), rel=1e-6)
    preds = predict_patients(path, cohort.patients)
    assert list(preds.columns) == [
        "PATIENT",
        "pred_score",
        "OS_time",
        "OS_event",
        f"cut_off={meta['survival_cut_off']}",
    ]


def test_multi_target_barspoon_trains(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny, "classification", [LABEL, "grade"])
    path, meta = _train(cohort, tmp_path, tiny_advanced("barspoon"))
    assert meta["n_outputs"] == [2, 2] and meta["ground_truth_label"] == [LABEL, "grade"]
    assert set(meta["class_weights"]) == {LABEL, "grade"}
    preds = predict_patients(path, cohort.patients)
    assert list(preds.columns) == [
        "PATIENT", LABEL, "grade", f"pred_{LABEL}", f"{LABEL}_{POS}", f"{LABEL}_{NEG}", "pred_grade", "grade_G1",
        "grade_G2", "loss",
    ]  # fmt: skip
    assert preds["grade"].isna().any()  # missing grade: loss from the other target only
    with pytest.raises(ValueError, match="does not support multi-target"):
        _train(cohort, tmp_path / "vit", tiny_advanced("vit"))


@pytest.mark.parametrize("level", ["slide", "patient"])
def test_embedding_level_mlp_trains(tmp_path: Path, level: str) -> None:
    tiny = write_tiny_cohort(tmp_path / "cohort", level=level, n_patients=24)
    cohort = tiny_cohort(tiny)
    assert cohort.feature_type == level
    path, meta = _train(cohort, tmp_path / "model", tiny_advanced(None))
    assert (
        meta["model_name"] == "mlp" and meta["feature_type"] == level and meta["extractor"].startswith("demo")
    )
    assert len(predict_patients(path, cohort.patients)) == 24


def test_one_cycle_schedule_is_stepped_per_batch_and_reaches_max_lr(tiny: Tiny, tmp_path: Path) -> None:
    steps: list[dict[str, float]] = []
    # min_steps_per_epoch 0: batch_size as given (the default floor would make it 8 steps of 3)
    advanced = tiny_advanced("abmil", max_epochs=4, max_lr=2e-3, div_factor=25, min_steps_per_epoch=0)
    _train(tiny_cohort(tiny), tmp_path, advanced, on_step=steps.append)
    lrs = [s["lr"] for s in steps]
    assert len(lrs) == 4 * 3  # 24 training patients / batch 8 = 3 steps per epoch
    assert lrs[0] == pytest.approx(2e-3 / 25)
    assert max(lrs) == pytest.approx(2e-3, rel=0.05)
    assert lrs[-1] < max(lrs) / 10
    metrics = pd.read_csv(tmp_path / TRAINING_METRICS_NAME)
    assert list(metrics["epoch"]) == [0, 1, 2, 3] and {
        "train_loss",
        "valid_loss",
        "valid_auroc",
        "lr_max",
    } <= set(metrics)


def test_early_stopping_uses_patience(tiny: Tiny, tmp_path: Path) -> None:
    _, meta = _train(
        tiny_cohort(tiny), tmp_path, tiny_advanced("abmil", max_epochs=12, patience=0, max_lr=1e-1)
    )
    assert meta["epochs_trained"] < 12 and meta["epochs_trained"] == meta["best_epoch"] + 1


def test_same_seed_gives_identical_models(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny)
    a, meta_a = _train(cohort, tmp_path / "a", tiny_advanced("vit"))
    b, meta_b = _train(cohort, tmp_path / "b", tiny_advanced("vit"))
    assert meta_a["train_patients"] == meta_b["train_patients"]
    pa, pb = predict_patients(a, cohort.patients), predict_patients(b, cohort.patients)
    pd.testing.assert_frame_equal(pa, pb, check_exact=False, atol=1e-6, rtol=0)
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = _train(cohort, tmp_path / "c", tiny_advanced("vit", seed=1))
    assert not predict_patients(c, cohort.patients)[f"{LABEL}_{POS}"].equals(pa[f"{LABEL}_{POS}"])


def test_inner_split_is_stratified_and_seeded(tiny: Tiny) -> None:
    cohort = tiny_cohort(tiny)
    train, valid = inner_split(cohort.patients, cohort, 3)
    assert len(valid) == 8 and sum(p.target == POS for p in valid) == 4
    assert [p.id for p in inner_split(cohort.patients, cohort, 3)[1]] == [p.id for p in valid]
    assert [p.id for p in inner_split(cohort.patients, cohort, 4)[1]] != [p.id for p in valid]


def test_abmil_learns_the_planted_signal(tiny: Tiny, tmp_path: Path) -> None:
    cohort = tiny_cohort(tiny)
    split = make_splits(cohort, 2, 0)[0]
    table = run_and_read(cohort, split, tmp_path, tiny_advanced("abmil", max_epochs=8, max_lr=1e-2))
    y = (table[LABEL] == POS).to_numpy().astype(int)
    assert auroc(y, table[[f"{LABEL}_{NEG}", f"{LABEL}_{POS}"]].to_numpy()) >= 0.9


def run_and_read(
    cohort: CohortData, split: dict[str, list[str]], out: Path, advanced: AdvancedConfig
) -> pd.DataFrame:
    return pd.read_csv(run_fold(cohort, split, out, advanced, advanced.seed))
