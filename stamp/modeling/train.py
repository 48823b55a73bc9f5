"""Training: an explicit PyTorch loop (AdamW + one-cycle LR stepped per batch + early stopping).

Design (stamp-facts §2.6, with STAMP's quirks of §7 fixed):

* the one-cycle schedule is stepped after every optimiser step, so it reaches ``max_lr``
  (STAMP steps it per epoch and stays near ``max_lr / div_factor``);
* early stopping and the choice of the saved epoch use an inner validation split of the
  training patients (:func:`inner_split`), never a test fold: validation loss (lower is better) for
  classification and regression, validation C-index (higher is better) for survival;
* ``seed``: same seed → the same split, batches, tile samples, initial weights and therefore the
  same checkpoint on CPU (deterministic algorithms are switched on while training);
* regression targets are standardised with the training mean/std for optimisation; predictions are
  mapped back, so losses and predictions are in the table's units;
* survival stores the median risk of the training patients (best model, full bags) as cut-off.

Departures for small cohorts (issue #15; each has a key that restores STAMP's behaviour):

* ``min_steps_per_epoch`` (default 8): when the training patients fill fewer batches than that, the
  batch shrinks to ``floor(patients / min_steps_per_epoch)`` (logged once with the numbers). At
  STAMP's batch 64, 36 training patients would otherwise give one optimiser step per epoch, 32 in
  the whole run. ``0`` keeps ``batch_size`` as given;
* ``selection_window`` (default 3): early stopping and the saved epoch follow the mean of the
  monitored validation figure over the last ``selection_window`` epochs, so one lucky epoch on a
  12-patient validation split does not pick the model. ``1`` is STAMP's per-epoch rule;
* validation bags are batched (sorted by size, padded and masked, a bounded number of tiles per
  batch) instead of one patient per forward pass; the test / deploy predictions stay one patient
  per pass;
* when every training and validation bag fits in memory (:class:`stamp.modeling.data.BagStore`), the
  data loaders run in the training process (``num_workers`` is used only when they do not fit).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, RandomSampler

from stamp.config_models import AdvancedConfig, resolve_accelerator
from stamp.modeling.checkpoint import (
    CHECKPOINT_NAME,
    config_hash,
    describe_versions,
    feature_provenance,
    infer_dim_input,
    save_checkpoint,
)
from stamp.modeling.losses import TargetCodec, class_weights
from stamp.modeling.metrics import auroc, concordance_index, pearson_r
from stamp.modeling.predictions import bag_dataset, forward_all, write_csv
from stamp.stopping import check_stop

__all__ = [
    "TRAINING_METRICS_NAME",
    "effective_batch_size",
    "has_target",
    "inner_split",
    "resolve_torch_device",
    "seed_everything",
    "stratify_label",
    "train_model",
]

TRAINING_METRICS_NAME = "training-metrics.csv"
#: padded tiles per validation batch (bags sorted by size; a larger bag goes alone)
VALID_BATCH_TILES = 8192
_logger = logging.getLogger("stamp")


def resolve_torch_device(accelerator: str | None) -> torch.device:
    """Map STAMP's ``accelerator`` (gpu|cuda|cpu|mps|auto|None) to a torch device."""
    name = resolve_accelerator(None if accelerator == "auto" else accelerator)
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"accelerator {accelerator!r} asked for a GPU but torch sees none; use 'cpu'")
        return torch.device("cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def has_target(patient: Any, cohort: Any) -> bool:
    """Whether ``patient`` has a target usable for training in ``cohort``'s task."""
    target = patient.target
    if cohort.task == "classification":
        if len(cohort.targets) > 1:
            return isinstance(target, Mapping) and any(not _missing(v) for v in target.values())
        return not _missing(target) and str(target) in cohort.categories[cohort.targets[0]]
    if cohort.task == "regression":
        return not _missing(target)
    return isinstance(target, (tuple, list)) and len(target) == 2 and not any(_missing(v) for v in target)


def stratify_label(patient: Any, cohort: Any) -> str | None:
    """Stratum of a patient for splits: the class (first target if several), the event; None for regression."""
    target = patient.target
    if cohort.task == "classification":
        if len(cohort.targets) > 1:
            value = target.get(cohort.targets[0]) if isinstance(target, Mapping) else None
            return "<missing>" if _missing(value) else str(value)
        return str(target)
    if cohort.task == "survival":
        return str(int(float(target[1]) > 0.5))
    return None


def inner_split(
    patients: Sequence[Any], cohort: Any, seed: int | None, valid_fraction: float = 0.25
) -> tuple[list[Any], list[Any]]:
    """Split training patients into (train, valid), stratified on the label / event status.

    Patients without a usable target are left out. ``seed=None`` uses 0, as STAMP does. If the
    classes are too small to stratify, the split is made without stratification (with a warning).
    """
    usable = sorted((p for p in patients if has_target(p, cohort)), key=lambda p: p.id)
    if len(usable) < 2:
        raise ValueError(f"need at least 2 patients with a target to train, got {len(usable)}")
    strata = [stratify_label(p, cohort) for p in usable]
    state = 0 if seed is None else seed
    try:
        train, valid = train_test_split(
            usable,
            test_size=valid_fraction,
            random_state=state,
            shuffle=True,
            stratify=None if strata[0] is None else strata,
        )
    except ValueError as exc:
        _logger.warning("cannot stratify the validation split (%s); splitting without stratification", exc)
        train, valid = train_test_split(usable, test_size=valid_fraction, random_state=state, shuffle=True)
    return sorted(train, key=lambda p: p.id), sorted(valid, key=lambda p: p.id)


def _choose_model(cohort: Any, advanced: AdvancedConfig, multi: bool) -> tuple[str, dict[str, Any]]:
    from stamp.modeling.models.registry import default_model_name, supports

    name = advanced.model_name or default_model_name(cohort.feature_type, multi)
    if not supports(name, cohort.feature_type, cohort.task, multi):
        kind = "multi-target " if multi else ""
        raise ValueError(
            f"advanced_config.model_name {name!r} does not support {kind}{cohort.task} on "
            f"{cohort.feature_type}-level features; choose another model_name"
        )
    params = getattr(advanced.model_params, name).model_dump(mode="json")
    return name, params


def _train_loader(dataset: Any, batch_size: int, num_workers: int, seed: int | None) -> DataLoader:
    """Shuffled training batches; the order depends only on ``seed`` and the epoch, not on workers.

    The sampler has its own generator: DataLoader draws worker base seeds from its ``generator``
    once per iterator (once in all with persistent workers, once per epoch without), which would
    otherwise shift the shuffle order with ``num_workers``.
    """
    from stamp.modeling.data import collate_bags

    sampler_rng = torch.Generator()
    loader_rng = torch.Generator()
    if seed is not None:
        sampler_rng.manual_seed(seed)
        loader_rng.manual_seed(seed + 1)
    else:
        sampler_rng.seed()
        loader_rng.seed()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=sampler_rng),
        collate_fn=collate_bags,
        num_workers=num_workers,
        generator=loader_rng,
        persistent_workers=num_workers > 0,  # BagDataset's epoch lives in shared memory
    )


def effective_batch_size(n_train: int, advanced: AdvancedConfig) -> int:
    """``batch_size``, shrunk so that ``n_train`` patients fill ≥ ``min_steps_per_epoch`` batches."""
    batch = advanced.batch_size
    floor = advanced.min_steps_per_epoch
    if floor <= 0 or n_train <= 0 or math.ceil(n_train / batch) >= floor:
        return batch
    return max(1, min(batch, n_train // floor))


def _monitor(task: str, codec: TargetCodec, valid: Sequence[Any]) -> tuple[str, bool]:
    """(metric name, higher is better) used for early stopping."""
    if not valid:
        _logger.warning("no validation patients: early stopping and checkpoint choice use the training loss")
        return "train_loss", False
    if task == "survival":
        time, event = codec.survival_arrays(valid)
        if math.isnan(concordance_index(time, np.zeros(len(time)), event)):
            _logger.warning("the validation patients have no comparable pair; monitoring the training loss")
            return "train_loss", False
        return "valid_cindex", True
    return "valid_loss", False


def _smoothed(history: Sequence[dict[str, float]], key: str, window: int) -> float:
    """Mean of ``key`` over the last ``window`` epochs (fewer at the start; NaNs skipped)."""
    values = [r[key] for r in history[-window:] if not math.isnan(r[key])]
    return float(np.mean(values)) if values else math.nan


def _evaluate(
    model: torch.nn.Module,
    codec: TargetCodec,
    patients: Sequence[Any],
    dataset: Any,
    weights: dict[str, torch.Tensor],
    device: torch.device,
    num_workers: int,
) -> dict[str, float]:
    """Validation loss and the task's metric on full bags (batched by size)."""
    if not patients:
        return {}
    raw = forward_all(
        model,
        dataset,
        feature_type=codec.feature_type,
        device=device,
        num_workers=num_workers,
        max_batch_tiles=VALID_BATCH_TILES,
    )
    y = codec.encode(patients)
    cpu_weights = {t: w.cpu() for t, w in weights.items()}
    result = {"valid_loss": float(codec.loss(raw, y, cpu_weights))}
    if codec.task == "classification":
        scores = []
        for t, logits in enumerate(codec.per_target(raw)):
            yt = y[:, t] if y.ndim == 2 else y
            scores.append(auroc(yt.numpy(), torch.softmax(logits, 1).numpy()))
        finite = [x for x in scores if not math.isnan(x)]
        result["valid_auroc"] = float(np.mean(finite)) if finite else math.nan
    elif codec.task == "regression":
        assert isinstance(raw, torch.Tensor)
        result["valid_pearson"] = pearson_r(y.numpy(), raw.reshape(-1).numpy())
    else:
        assert isinstance(raw, torch.Tensor)
        time, event = codec.survival_arrays(patients)
        result["valid_cindex"] = concordance_index(time, raw.reshape(-1).numpy(), event)
    return result


def train_model(
    train: Sequence[Any],
    valid: Sequence[Any],
    cohort: Any,
    *,
    advanced: AdvancedConfig,
    output_dir: Path,
    seed: int | None,
    log: logging.Logger | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    provenance: str | None = None,
) -> Path:
    """Train one model on ``train``, choose the epoch on ``valid``; return ``<output_dir>/model.ckpt``.

    ``cohort`` is a :class:`stamp.cohort.CohortData` (task, feature type, targets, categories).
    ``on_step`` (optional) is called after every optimiser step with ``epoch, step, lr, loss``.
    ``provenance``: the key of :func:`stamp.modeling.provenance.training_provenance`, kept in the
    checkpoint's ``meta`` so a later run can tell whether the checkpoint is still this training's.
    Per-epoch figures are logged and written to ``<output_dir>/training-metrics.csv``.
    """
    from stamp.modeling.data import BagDataset, bag_store
    from stamp.modeling.models.registry import build_model

    log = log or _logger
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train = sorted((p for p in train if has_target(p, cohort)), key=lambda p: p.id)
    valid = sorted((p for p in valid if has_target(p, cohort)), key=lambda p: p.id)
    if not train:
        raise ValueError("no training patient with a target")
    overlap = {p.id for p in train} & {p.id for p in valid}
    if overlap:
        raise ValueError(f"patients in both training and validation sets: {sorted(overlap)[:5]}")
    codec = TargetCodec.from_cohort(cohort, train)
    weights = {
        t: class_weights(codec.labels(train, t), codec.categories[t], target=t) for t in codec.class_targets
    }
    name, params = _choose_model(cohort, advanced, codec.multi)
    dim_input = infer_dim_input(train[0])
    extractor, weights_sha = feature_provenance([*train, *valid])
    device = resolve_torch_device(advanced.accelerator)
    tile = cohort.feature_type == "tile"
    peak_lr = params["learning_rate"] if name == "barspoon" else advanced.max_lr

    batch_size = effective_batch_size(len(train), advanced)
    if batch_size != advanced.batch_size:
        log.info(
            "batch_size %d -> %d: %d training patients would give %d optimiser step(s) per epoch; "
            "advanced_config.min_steps_per_epoch = %d keeps at least that many (%d steps); "
            "set min_steps_per_epoch: 0 to train with batch_size %d as given",
            advanced.batch_size, batch_size, len(train), math.ceil(len(train) / advanced.batch_size),
            advanced.min_steps_per_epoch, math.ceil(len(train) / batch_size), advanced.batch_size,
        )  # fmt: skip
    # every bag in memory: the loaders run here; workers would only copy what this process holds
    in_memory = bag_store().fits([p.feature_files for p in [*train, *valid]])
    workers = 0 if in_memory else advanced.num_workers

    with _deterministic():
        if seed is not None:
            seed_everything(seed)
        model = build_model(name, dim_input=dim_input, n_outputs=codec.n_outputs, params=params).to(device)
        train_ds = BagDataset(
            list(train),
            bag_size=advanced.bag_size if tile else None,
            seed=seed,
            cache=workers == 0,
        )
        train_dl = _train_loader(train_ds, batch_size, workers, seed)
        total_steps = len(train_dl) * advanced.max_epochs
        opt = torch.optim.AdamW(model.parameters(), lr=peak_lr / advanced.div_factor)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=peak_lr, total_steps=total_steps, div_factor=advanced.div_factor
        )
        y_train = codec.encode(train)
        w_tensors = {t: torch.as_tensor(w, dtype=torch.float32, device=device) for t, w in weights.items()}
        monitor, higher_better = _monitor(cohort.task, codec, valid)
        valid_ds = bag_dataset(valid, cache=workers == 0)
        log.info(
            "training %s (%s, %d train / %d valid patients, dim %d) for up to %d epochs, %d steps, monitor %s",
            name, cohort.task, len(train), len(valid), dim_input, advanced.max_epochs, total_steps, monitor,
        )  # fmt: skip
        best_value, best_epoch, best_state, wait, step = math.nan, -1, None, 0, 0
        history: list[dict[str, float]] = []
        for epoch in range(advanced.max_epochs):
            train_ds.set_epoch(epoch)
            model.train()
            losses, lr_max = [], 0.0
            for feats, coords, mask, idx in train_dl:
                check_stop()  # SIGTERM / a cancelled run stops between optimiser steps
                out = model(feats.to(device), coords.to(device), mask.to(device) if tile else None)
                loss = codec.loss(out, y_train[idx].to(device), w_tensors)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = float(opt.param_groups[0]["lr"])
                opt.step()
                sched.step()
                step += 1
                lr_max = max(lr_max, lr)
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step, "lr": lr, "loss": losses[-1]})
            model.eval()
            row = {"epoch": float(epoch), "lr_max": lr_max, "train_loss": float(np.mean(losses))}
            row.update(_evaluate(model, codec, valid, valid_ds, w_tensors, device, workers))
            history.append(row)
            value = _smoothed(history, monitor, advanced.selection_window)
            if advanced.selection_window > 1:
                row[f"{monitor}_smoothed"] = value
            improved = best_epoch < 0 or (
                not math.isnan(value) and (value > best_value if higher_better else value < best_value)
            )
            log.info(
                "epoch %d/%d: %s%s",
                epoch + 1,
                advanced.max_epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
                " (best)" if improved else "",
            )
            if improved:
                best_value, best_epoch, wait = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                wait += 1
            write_csv(pd.DataFrame(history), output_dir / TRAINING_METRICS_NAME)
            if wait and wait >= advanced.patience:  # Lightning's rule: `patience` epochs without improvement
                log.info("early stopping after epoch %d (best epoch %d)", epoch + 1, best_epoch + 1)
                break
        assert best_state is not None
        model.load_state_dict(best_state)
        model.eval()
        cut_off = None
        if cohort.task == "survival":
            risk = forward_all(
                model,
                bag_dataset(train, cache=False),
                feature_type=codec.feature_type,
                device=device,
                num_workers=workers,
            )
            assert isinstance(risk, torch.Tensor)
            cut_off = float(np.median(risk.reshape(-1).numpy()))

    meta: dict[str, Any] = {
        "task": cohort.task,
        "model_name": name,
        "model_params": params,
        "dim_input": dim_input,
        "n_outputs": codec.n_outputs,
        "feature_type": cohort.feature_type,
        "targets": list(cohort.targets),
        "ground_truth_label": codec.ground_truth_label,
        "time_label": cohort.targets[0] if cohort.task == "survival" else None,
        "status_label": cohort.targets[1] if cohort.task == "survival" else None,
        "categories": {t: list(c) for t, c in codec.categories.items()},
        "class_weights": {t: [float(x) for x in w] for t, w in weights.items()},
        "train_patients": [p.id for p in train],
        "valid_patients": [p.id for p in valid],
        "extractor": extractor,
        "weights_sha256": weights_sha,
        **describe_versions(),
        "survival_cut_off": cut_off,
        "target_mean": codec.target_mean,
        "target_std": codec.target_std,
        "seed": seed,
        "best_epoch": best_epoch + 1,
        "epochs_trained": len(history),
        "monitor": monitor,
        "monitor_value": best_value,
        "selection_window": advanced.selection_window,
        "batch_size": batch_size,
        "advanced_config": advanced.model_dump(mode="json"),
        "provenance": provenance,
    }
    meta["config_hash"] = config_hash(
        {
            "task": cohort.task,
            "targets": meta["targets"],
            "categories": meta["categories"],
            "model_name": name,
            "model_params": params,
            "advanced": advanced.model_dump(mode="json", exclude={"num_workers", "accelerator"}),
        }
    )
    path = save_checkpoint(output_dir / CHECKPOINT_NAME, model, meta)
    log.info("saved %s (epoch %d, %s %.4g)", path, best_epoch + 1, monitor, best_value)
    return path
