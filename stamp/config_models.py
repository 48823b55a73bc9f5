"""Pydantic models of the STAMP 2.5 ``config.yaml`` schema, plus our ``orchestration`` section.

One model per section; key names, defaults and enum values are STAMP's so that a STAMP 2.5
config loads unchanged. Every model forbids unknown keys. Loading, dumping and error messages
live in :mod:`stamp.config`; this module only describes the schema.

Machine-dependent defaults:

* ``device`` (preprocessing, heatmaps, slide/patient encoding) and ``accelerator``
  (advanced_config, deployment) default to ``None`` meaning *auto*, resolved where the stage
  runs with :func:`resolve_device` / :func:`resolve_accelerator` (``cuda``/``gpu`` when torch
  sees a GPU, else ``cpu``). This keeps torch out of config loading (``stamp config`` and
  ``stamp --help`` stay fast) and lets a config validated on a CPU-only head node pick up the
  GPU of the worker that runs the stage.
* ``num_workers`` defaults to ``min(os.cpu_count(), 16)`` on the machine that builds the model.
"""

from __future__ import annotations

import glob
import os
import re
import reprlib
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ACCELERATORS",
    "ENCODER_NAMES",
    "MODEL_NAMES",
    "STAGE_NAMES",
    "TASKS",
    "AdvancedConfig",
    "AbmilModelParams",
    "BarspoonModelParams",
    "CrossvalConfig",
    "DeploymentConfig",
    "HeatmapsConfig",
    "LinearModelParams",
    "MlpModelParams",
    "ModelParams",
    "OrchestrationConfig",
    "PatientEncodingConfig",
    "PreprocessingConfig",
    "SlideEncodingConfig",
    "StampConfig",
    "StatisticsConfig",
    "TrainingConfig",
    "TransMILModelParams",
    "VitModelParams",
    "default_num_workers",
    "resolve_accelerator",
    "resolve_device",
]

# --------------------------------------------------------------------------- enums (STAMP's strings)

EncoderName = Literal["cobra", "eagle", "chief", "titan", "gigapath", "madeleine", "prism"]
Task = Literal["classification", "regression", "survival"]
ModelName = Literal["vit", "mlp", "trans_mil", "linear", "barspoon", "abmil"]  # abmil: ours
Accelerator = Literal["gpu", "cpu", "cuda", "mps", "auto"]
StageName = Literal[
    "preprocess",
    "encode_slides",
    "encode_patients",
    "train",
    "crossval",
    "deploy",
    "statistics",
    "heatmaps",
]

ENCODER_NAMES: tuple[str, ...] = get_args(EncoderName)
TASKS: tuple[str, ...] = get_args(Task)
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
ACCELERATORS: tuple[str, ...] = get_args(Accelerator)
STAGE_NAMES: tuple[str, ...] = get_args(StageName)

# --------------------------------------------------------------------------- value types

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_DEPLOYMENT_RE = re.compile(r"^[^/\s]+/[^/\s]+$")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 3
_REPR.maxlevel = 2


def _short(value: Any) -> str:
    """A bounded repr for messages: never formats a huge value (alias bombs, long strings) whole."""
    return _REPR.repr(value)


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {_short(value)}")
    return value


def _check_labels(value: Any) -> Any:
    """Accept one column name or a list of column names (multi-target), nothing else."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise ValueError(f"expected a column name or a non-empty list of column names, got {_short(value)}")


def _check_deployment(value: str) -> str:
    if not _DEPLOYMENT_RE.match(value):
        raise ValueError(
            f"expected a deployment name of the form 'flow-name/deployment-name', got {_short(value)}"
        )
    return value


def _check_api_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {_short(value)}")
    return value


def _check_extractor(value: str) -> str:
    """A name the tile-encoder registry holds (asked lazily: the registry is not imported with the schema)."""
    from stamp.encoders.registry import ENCODERS

    if value not in ENCODERS:
        # the error kind of a Literal, so messages list the choices and the closest name
        names = ", ".join(repr(name) for name in sorted(ENCODERS))
        raise PydanticCustomError("literal_error", "Input should be one of {expected}", {"expected": names})
    return value


Device = Annotated[str, AfterValidator(_check_device)]
#: a ``preprocessing.extractor`` value: a name in :data:`stamp.encoders.ENCODERS`
ExtractorName = Annotated[str, AfterValidator(_check_extractor)]
Labels = Annotated[str | list[str] | None, BeforeValidator(_check_labels)]
DeploymentName = Annotated[str, AfterValidator(_check_deployment)]
ApiUrl = Annotated[str, AfterValidator(_check_api_url)]


def default_num_workers() -> int:
    """STAMP's data-loader worker default: the number of CPU cores, at most 16."""
    return min(os.cpu_count() or 1, 16)


def _cuda_available() -> bool:
    if sys.platform.startswith("linux") and not (
        glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")
    ):
        return False  # no GPU device node: torch would say no as well, after seconds of importing
    try:
        import torch  # deferred: importing torch costs seconds
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_device(device: str | None) -> str:
    """Return ``device`` or, when it is ``None`` (auto), ``"cuda"`` if torch sees a GPU else ``"cpu"``."""
    if device is not None:
        return device
    return "cuda" if _cuda_available() else "cpu"


def resolve_accelerator(accelerator: str | None) -> str:
    """Return ``accelerator`` or, when it is ``None`` (auto), ``"gpu"`` if torch sees a GPU else ``"cpu"``."""
    if accelerator is not None:
        return accelerator
    return "gpu" if _cuda_available() else "cpu"


# Upper bounds of counts: far above any real STAMP config, low enough that one file cannot ask for
# 100,000 runs, threads or GPU-hours (security review M4).
_MAX_DIM = 65536
_MAX_HEADS = 256
_MAX_LAYERS = 128
_MAX_WORKERS = 256


class _Section(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- preprocessing


class PreprocessingConfig(_Section):
    """``preprocessing``: tile slides, reject background, extract tile features."""

    output_dir: Path
    wsi_dir: Path
    extractor: ExtractorName
    wsi_list: Path | None = None
    cache_dir: Path | None = None
    cache_tiles_ext: Literal["jpg", "png"] = "jpg"
    tile_size_um: float = Field(default=256.0, gt=0)
    tile_size_px: int = Field(default=224, gt=0, le=16384)
    max_workers: int = Field(default=8, ge=1, le=256)
    device: Device | None = None
    generate_hash: bool = True
    default_slide_mpp: float | None = Field(default=None, gt=0)
    brightness_cutoff: int | None = Field(default=240, gt=0, lt=255)
    canny_cutoff: float | None = Field(default=0.02, gt=0, lt=1)
    # ---- our additions; the defaults keep STAMP's behaviour
    reader: Literal["auto", "openslide", "tifffile", "fast"] = "auto"
    tissue_method: Literal["stamp", "otsu"] = "stamp"
    min_tissue_fraction: float = Field(default=0.1, ge=0, le=1)
    stain_norm: Literal["macenko", "reinhard"] | None = None
    weights_dir: Path | None = None
    batch_size: int = Field(default=64, ge=1, le=4096)
    #: a tile scale or size other than the extractor's operating point: false warns, true is an error
    strict_operating_point: bool = False

    @model_validator(mode="after")
    def _operating_point(self) -> PreprocessingConfig:
        from stamp.encoders.errors import OperatingPointWarning
        from stamp.encoders.registry import check_operating_point

        problem = check_operating_point(self.extractor, self.tile_size_um, self.tile_size_px)
        if problem is not None:
            if self.strict_operating_point:
                # the error is reported under "preprocessing:" already
                raise ValueError(f"{problem.removeprefix('preprocessing.')} (strict_operating_point: true)")
            warnings.warn(problem, OperatingPointWarning, stacklevel=2)
        return self


# --------------------------------------------------------------------------- modeling


class TrainingConfig(_Section):
    """``training``: train one model with an internal train/validation split."""

    task: Task = "classification"
    output_dir: Path
    clini_table: Path
    slide_table: Path | None = None
    feature_dir: Path
    ground_truth_label: Labels = None
    categories: list[str] | None = None
    status_label: str | None = None
    time_label: str | None = None
    drop_patients_with_missing_ground_truth: bool = True
    patient_label: str = "PATIENT"
    filename_label: str = "FILENAME"
    params_path: Path | None = None
    use_vary_precision_transform: bool = False


class CrossvalConfig(TrainingConfig):
    """``crossval``: the training keys plus the number of folds."""

    n_splits: int = Field(default=5, ge=2, le=100)


class DeploymentConfig(_Section):
    """``deployment``: predict an external cohort with one or more checkpoints."""

    output_dir: Path
    checkpoint_paths: list[Path] = Field(min_length=1)
    clini_table: Path | None = None
    slide_table: Path | None = None
    feature_dir: Path
    ground_truth_label: Labels = None
    patient_label: str = "PATIENT"
    filename_label: str = "FILENAME"
    status_label: str | None = None
    time_label: str | None = None
    drop_patients_with_missing_ground_truth: bool = True
    num_workers: int = Field(default_factory=default_num_workers, ge=0, le=_MAX_WORKERS)
    accelerator: Accelerator | None = None


class VitModelParams(_Section):
    """``model_params.vit``: the default tile-level transformer."""

    dim_model: int = Field(default=512, ge=1, le=_MAX_DIM)
    dim_feedforward: int = Field(default=512, ge=1, le=_MAX_DIM)
    n_heads: int = Field(default=8, ge=1, le=_MAX_HEADS)
    n_layers: int = Field(default=2, ge=1, le=_MAX_LAYERS)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    use_alibi: bool = False


class TransMILModelParams(_Section):
    """``model_params.trans_mil``."""

    dim_hidden: int = Field(default=512, ge=1, le=_MAX_DIM)


class AbmilModelParams(_Section):
    """``model_params.abmil`` (ours): gated-attention MIL (Ilse et al. 2018)."""

    dim_hidden: int = Field(default=256, ge=1, le=_MAX_DIM)
    dropout: float = Field(default=0.25, ge=0, lt=1)


class MlpModelParams(_Section):
    """``model_params.mlp``: the default slide/patient-level model."""

    dim_hidden: int = Field(default=512, ge=1, le=_MAX_DIM)
    num_layers: int = Field(default=2, ge=1, le=_MAX_LAYERS)
    dropout: float = Field(default=0.25, ge=0, lt=1)


class BarspoonModelParams(_Section):
    """``model_params.barspoon``: multi-target encoder-decoder transformer."""

    d_model: int = Field(default=512, ge=1, le=_MAX_DIM)
    num_encoder_heads: int = Field(default=8, ge=1, le=_MAX_HEADS)
    num_decoder_heads: int = Field(default=8, ge=1, le=_MAX_HEADS)
    num_encoder_layers: int = Field(default=2, ge=1, le=_MAX_LAYERS)
    num_decoder_layers: int = Field(default=2, ge=1, le=_MAX_LAYERS)
    dim_feedforward: int = Field(default=2048, ge=1, le=_MAX_DIM)
    positional_encoding: bool = True
    learning_rate: float = Field(default=1e-4, gt=0)


class LinearModelParams(BarspoonModelParams):
    """``model_params.linear``: the linear model has no parameters of its own.

    STAMP 2.5's schema accepts the barspoon keys here too (and ignores them), so we do the same
    to load such configs unchanged.
    """


class ModelParams(_Section):
    """``advanced_config.model_params``: one block per model; an empty block means defaults."""

    vit: VitModelParams = Field(default_factory=VitModelParams)
    trans_mil: TransMILModelParams = Field(default_factory=TransMILModelParams)
    mlp: MlpModelParams = Field(default_factory=MlpModelParams)
    linear: LinearModelParams = Field(default_factory=LinearModelParams)
    barspoon: BarspoonModelParams = Field(default_factory=BarspoonModelParams)
    abmil: AbmilModelParams = Field(default_factory=AbmilModelParams)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_block_means_defaults(cls, value: Any) -> Any:
        return {} if value is None else value


class AdvancedConfig(_Section):
    """``advanced_config``: training hyper-parameters shared by ``train`` and ``crossval``."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    bag_size: int = Field(default=512, ge=1, le=65536)
    num_workers: int = Field(default_factory=default_num_workers, ge=0, le=_MAX_WORKERS)
    batch_size: int = Field(default=64, ge=1, le=4096)
    max_epochs: int = Field(default=32, ge=1, le=10000)
    patience: int = Field(default=16, ge=0, le=10000)
    accelerator: Accelerator | None = None
    max_lr: float = Field(default=1e-4, gt=0)
    div_factor: float = Field(default=25.0, gt=0)
    model_name: ModelName | None = None
    model_params: ModelParams = Field(default_factory=ModelParams)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    # ours (issue #15): small cohorts train at the defaults. 0 / 1 give STAMP's behaviour.
    min_steps_per_epoch: int = Field(default=8, ge=0, le=100000)
    selection_window: int = Field(default=3, ge=1, le=1000)

    @field_validator("model_params", mode="before")
    @classmethod
    def _empty_params_mean_defaults(cls, value: Any) -> Any:
        return {} if value is None else value


# --------------------------------------------------------------------------- statistics, heatmaps


class StatisticsConfig(_Section):
    """``statistics``: metrics, confidence intervals and plots from prediction CSVs."""

    task: Task = "classification"
    output_dir: Path
    pred_csvs: list[Path] = Field(min_length=1)
    ground_truth_label: Labels = None
    true_class: str | None = None
    time_label: str | None = None
    status_label: str | None = None


class HeatmapsConfig(_Section):
    """``heatmaps``: tile relevance maps, overlays and top/bottom tiles."""

    output_dir: Path
    feature_dir: Path
    wsi_dir: Path
    checkpoint_path: Path
    slide_paths: list[Path] | None = None
    device: Device | None = None
    opacity: float = Field(default=0.6, ge=0, le=1)
    topk: int = Field(default=0, ge=0, le=10000)
    bottomk: int = Field(default=0, ge=0, le=10000)
    default_slide_mpp: float | None = Field(default=None, gt=0)
    # ours: points of the integrated-gradients path (1 = STAMP's plain gradient × input)
    ig_steps: int = Field(default=8, ge=1, le=1024)


# --------------------------------------------------------------------------- slide / patient encoding


class SlideEncodingConfig(_Section):
    """``slide_encoding``: one embedding per slide from its tile features."""

    encoder: EncoderName
    output_dir: Path
    feat_dir: Path
    device: Device | None = None
    agg_feat_dir: Path | None = None
    generate_hash: bool = True


class PatientEncodingConfig(SlideEncodingConfig):
    """``patient_encoding``: one embedding per patient from all of its slides."""

    slide_table: Path
    patient_label: str = "PATIENT"
    filename_label: str = "FILENAME"


# --------------------------------------------------------------------------- ours


class OrchestrationConfig(_Section):
    """``orchestration`` (ours, optional): where and how the Prefect flows run.

    The defaults need no server: flows run against Prefect's embedded local API.
    """

    prefect_api_url: ApiUrl | None = None
    prefect_home: Path | None = None
    result_dir: Path | None = None
    task_concurrency: int = Field(default=2, ge=1, le=256)
    deployments: dict[StageName, DeploymentName] = Field(default_factory=dict)
    preprocess_shards: int = Field(default=1, ge=1, le=1024)
    deployment_timeout_s: float | None = Field(default=None, gt=0, le=30 * 24 * 3600)


# --------------------------------------------------------------------------- whole file


class StampConfig(_Section):
    """The whole ``config.yaml``: every section is optional; each command reads its own."""

    preprocessing: PreprocessingConfig | None = None
    training: TrainingConfig | None = None
    crossval: CrossvalConfig | None = None
    deployment: DeploymentConfig | None = None
    statistics: StatisticsConfig | None = None
    heatmaps: HeatmapsConfig | None = None
    slide_encoding: SlideEncodingConfig | None = None
    patient_encoding: PatientEncodingConfig | None = None
    advanced_config: AdvancedConfig | None = None
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
