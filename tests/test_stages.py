"""The stage table (stamp/stages.py) is the one place a stage is spelled: check it against what reads it."""

from __future__ import annotations

import importlib
import inspect
from typing import get_args

import pytest
from prefect import Flow

from stamp.cli import HANDLERS, build_parser
from stamp.config_models import StageName, StampConfig
from stamp.stages import STAGES, get_stage
from stamp_flows.cohort import stage_flow, stage_parameters
from tests.conftest import REPO_ROOT

EXPECTED_PARAMS = {"config": {"config"}, "section": {"section"}, "section+advanced": {"section", "advanced"}}


def test_every_stage_has_a_config_section_a_cli_command_and_a_config_stage_name() -> None:
    assert [s.name for s in STAGES] == list(dict.fromkeys(s.name for s in STAGES)), "names are unique"
    assert {s.name for s in STAGES} == set(get_args(StageName))
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for stage in STAGES:
        assert stage.section in StampConfig.model_fields, stage
        assert stage.name in commands
        assert (stage.name in HANDLERS) == stage.built


@pytest.mark.parametrize("stage", [s for s in STAGES if s.built], ids=lambda s: s.name)
def test_a_built_stage_names_a_prefect_flow_taking_its_parameters(stage) -> None:  # noqa: ANN001
    flow = stage_flow(stage.name)
    assert isinstance(flow, Flow)
    params = set(inspect.signature(flow.fn).parameters)
    assert EXPECTED_PARAMS[stage.params] <= params, (stage.name, params)
    module, function = stage.flow.split(":")
    assert getattr(importlib.import_module(module), function) is flow
    assert (REPO_ROOT / stage.flow_file.split(":")[0]).is_file()
    if stage.image is not None:
        assert (REPO_ROOT / "containers" / f"{stage.image}.Dockerfile").is_file()


def test_unbuilt_stage_names_its_issue_and_unknown_stage_lists_the_known_ones() -> None:
    for stage in STAGES:
        assert stage.built or stage.issue is not None
    with pytest.raises(ValueError, match="choose from preprocess, encode_slides"):
        get_stage("segment")


def test_stage_parameters_follow_the_table(tmp_path) -> None:  # noqa: ANN001
    from stamp.config import load_config

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "preprocessing:\n  output_dir: o\n  wsi_dir: w\n  extractor: empty\n"
        "crossval:\n  output_dir: cv\n  clini_table: c.csv\n  slide_table: s.csv\n"
        "  feature_dir: f\n  ground_truth_label: y\n"
        "statistics:\n  output_dir: st\n  pred_csvs: [p.csv]\n  ground_truth_label: y\n"
    )
    cfg = load_config(cfg_path)
    assert set(stage_parameters("preprocess", cfg)) == {"config"}
    assert set(stage_parameters("crossval", cfg)) == {"section", "advanced"}
    assert set(stage_parameters("statistics", cfg)) == {"section"}
    cfg_path.write_text(cfg_path.read_text() + "orchestration:\n  task_concurrency: 1\n")
    assert stage_parameters("crossval", load_config(cfg_path))["task_concurrency"] == 1, (
        "folds at once, as set"
    )
