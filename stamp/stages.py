"""The pipeline's stages, in one table: what the CLI, config validation, the cohort flow, the deployments
and (later) the MCP tools read.

Adding a stage = one :class:`Stage` row here + its library function + its flow (+ a ``cmd_<name>`` handler
in :mod:`stamp.cli_stages` when its terminal output differs from the generic one). See CONTRIBUTING.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How a stage flow takes its config: ``config`` (the section as ``config=``), ``section`` (as ``section=``),
#: ``section+advanced`` (``section=`` and the ``advanced_config`` section as ``advanced=``).
ParamStyle = Literal["config", "section", "section+advanced"]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str  # the CLI command and the cohort-flow stage name (STAMP's command name)
    section: str  # the config section it reads
    help: str  # one line for ``stamp --help``
    flow: str | None  # ``module:function`` of its Prefect flow; None while not built
    params: ParamStyle = "section"
    per_slide_tasks: bool = False  # its flow runs one task per slide on ``task_concurrency`` threads
    image: str | None = (
        None  # its container image (containers/<image>.Dockerfile) when it runs as a deployment
    )
    issue: int | None = None  # the issue that builds it, while not built

    @property
    def built(self) -> bool:
        """True when the stage has a flow."""
        return self.flow is not None

    @property
    def flow_file(self) -> str | None:
        """The flow's file relative to the repository (a deployment's entrypoint), e.g. ``flows/statistics.py``."""
        if self.flow is None:
            return None
        module, function = self.flow.split(":")
        return f"flows/{module.removeprefix('stamp_flows.')}.py:{function}"


#: Every stage, in the order the cohort flow runs them.
STAGES: tuple[Stage, ...] = (
    Stage(
        "preprocess",
        "preprocessing",
        "Tile whole-slide images, reject background and extract tile features (h5 per slide)",
        "stamp_flows.preprocess:preprocess_flow",
        params="config",
        per_slide_tasks=True,
        image="preprocess",
    ),
    Stage(
        "encode_slides",
        "slide_encoding",
        "Turn tile features into one embedding per slide with a slide encoder",
        None,
        issue=13,
    ),
    Stage(
        "encode_patients",
        "patient_encoding",
        "Turn all tile features of a patient into one patient embedding",
        None,
        issue=13,
    ),
    Stage(
        "crossval",
        "crossval",
        "Train and evaluate MIL models with patient-level k-fold cross-validation",
        "stamp_flows.modeling:crossval_flow",
        params="section+advanced",
        image="modeling",
    ),
    Stage(
        "train",
        "training",
        "Train one MIL model on all patients (inner validation split for early stopping)",
        "stamp_flows.modeling:train_flow",
        params="section+advanced",
        image="modeling",
    ),
    Stage(
        "deploy",
        "deployment",
        "Predict an external cohort with one or more trained models",
        "stamp_flows.modeling:deploy_flow",
        image="modeling",
    ),
    Stage(
        "statistics",
        "statistics",
        "Compute AUROC/AUPRC (etc.) with 95%% CIs and plot ROC/PR/KM/scatter curves",
        "stamp_flows.statistics:statistics_flow",
        image="report",
    ),
    Stage(
        "heatmaps",
        "heatmaps",
        "Draw relevance heatmaps and top/bottom tiles for a trained model",
        "stamp_flows.heatmaps:heatmaps_flow",
        per_slide_tasks=True,
        image="report",
    ),
)

STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get_stage(name: str) -> Stage:
    """The stage called ``name``; a ValueError listing the stages otherwise."""
    try:
        return STAGE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGE_BY_NAME)}") from None
