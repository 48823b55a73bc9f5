"""Tests of stamp.config: STAMP 2.5 configs load unchanged, errors name file and key, template."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

import stamp.config_models as models
from stamp.config import (
    ConfigError,
    dump_config,
    load_config,
    require_section,
    section_yaml,
    template_text,
    write_template,
)
from stamp.config_models import STAGE_NAMES, StampConfig, resolve_accelerator, resolve_device

STAMP_CONFIG = Path(__file__).parent / "data" / "stamp_2_5_config.yaml"

MINIMAL = """
preprocessing:
  output_dir: /out
  wsi_dir: /wsi
  extractor: ctranspath
training:
  output_dir: /out
  clini_table: /clini.csv
  feature_dir: /feats
crossval:
  output_dir: /out
  clini_table: /clini.csv
  feature_dir: /feats
deployment:
  output_dir: /out
  checkpoint_paths: [/model.ckpt]
  feature_dir: /feats
statistics:
  output_dir: /out
  pred_csvs: [/preds.csv]
heatmaps:
  output_dir: /out
  feature_dir: /feats
  wsi_dir: /wsi
  checkpoint_path: /model.ckpt
slide_encoding:
  encoder: chief
  output_dir: /out
  feat_dir: /feats
patient_encoding:
  encoder: chief
  output_dir: /out
  feat_dir: /feats
  slide_table: /slide.csv
advanced_config: {}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


PREPROCESSING_HEAD = """
preprocessing:
  output_dir: /out
  wsi_dir: /wsi
  extractor: ctranspath
"""

TRAINING_HEAD = """
training:
  output_dir: /out
  clini_table: /clini.csv
  feature_dir: /feats
"""


# --------------------------------------------------------------------------- STAMP config loads


def test_stamp_2_5_config_loads_unchanged_and_every_value_arrives() -> None:
    cfg = load_config(STAMP_CONFIG)

    pre = cfg.preprocessing
    assert pre is not None
    assert pre.output_dir == Path("/data/tcga-crc/features")
    assert pre.wsi_dir == Path("/data/tcga-crc/slides")
    assert pre.extractor == "uni2"
    assert pre.device == "cuda:0"
    assert pre.cache_dir == Path("/scratch/tile-cache")
    assert pre.wsi_list is None

    cv = cfg.crossval
    assert cv is not None
    assert cv.clini_table == Path("/data/tcga-crc/TCGA-CRC_clini.xlsx")
    assert cv.ground_truth_label == "isMSIH"
    assert cv.categories == ["MSIH", "nonMSIH"]
    assert cv.n_splits == 5
    assert cv.task == "classification"

    train = cfg.training
    assert train is not None
    assert (train.task, train.time_label, train.status_label) == ("survival", "OS_days", "OS_event")
    assert train.ground_truth_label is None

    dep = cfg.deployment
    assert dep is not None
    assert len(dep.checkpoint_paths) == 5
    assert dep.checkpoint_paths[4] == Path("/data/tcga-crc/crossval-msi/split-4/model.ckpt")
    assert all(isinstance(p, Path) for p in dep.checkpoint_paths)

    stats = cfg.statistics
    assert stats is not None
    assert stats.true_class == "MSIH"
    assert [p.parent.name for p in stats.pred_csvs] == [f"split-{i}" for i in range(5)]

    hm = cfg.heatmaps
    assert hm is not None
    assert hm.slide_paths == [Path("TCGA-AA-3511-01Z-00-DX1.svs"), Path("batch2/TCGA-CM-4743-01Z-00-DX1.svs")]
    assert (hm.topk, hm.bottomk, hm.opacity) == (5, 5, 0.6)

    assert cfg.slide_encoding is not None
    assert (cfg.slide_encoding.encoder, cfg.slide_encoding.device) == ("titan", "cuda")
    pe = cfg.patient_encoding
    assert pe is not None
    assert pe.encoder == "eagle"
    assert pe.agg_feat_dir == Path("/data/tcga-crc/features/virchow2-0d3b6f19")
    assert pe.generate_hash is False
    assert pe.slide_table == Path("/data/tcga-crc/TCGA-CRC_slide.csv")

    adv = cfg.advanced_config
    assert adv is not None
    assert adv.max_epochs == 40
    assert adv.seed == 42
    assert adv.model_name == "vit"
    # YAML 1.1 reads `1e-4` (no dot) as a string; it must still arrive as the number.
    assert adv.max_lr == pytest.approx(1e-4) and isinstance(adv.max_lr, float)
    assert adv.div_factor == 25.0
    assert adv.model_params.vit.dropout == 0.25
    assert adv.model_params.trans_mil.dim_hidden == 256
    assert adv.model_params.barspoon.positional_encoding is True
    assert adv.model_params.barspoon.learning_rate == pytest.approx(1e-4)  # omitted: default


def test_omitted_keys_take_stamp_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    pre = cfg.preprocessing
    assert pre is not None
    assert pre.tile_size_um == 256.0
    assert pre.tile_size_px == 224
    assert pre.brightness_cutoff == 240
    assert pre.canny_cutoff == 0.02
    assert pre.max_workers == 8
    assert pre.cache_tiles_ext == "jpg"
    assert pre.generate_hash is True
    assert pre.default_slide_mpp is None
    assert pre.device is None  # auto, resolved where the stage runs

    assert cfg.training is not None and cfg.crossval is not None
    for section in (cfg.training, cfg.crossval):
        assert section.task == "classification"
        assert section.patient_label == "PATIENT"
        assert section.filename_label == "FILENAME"
        assert section.drop_patients_with_missing_ground_truth is True
        assert section.use_vary_precision_transform is False
        assert section.slide_table is None
    assert cfg.crossval.n_splits == 5

    assert cfg.deployment is not None
    assert cfg.deployment.num_workers == min(os.cpu_count() or 1, 16)
    assert cfg.deployment.clini_table is None
    assert cfg.statistics is not None
    assert cfg.statistics.task == "classification"

    hm = cfg.heatmaps
    assert hm is not None
    assert (hm.opacity, hm.topk, hm.bottomk, hm.slide_paths) == (0.6, 0, 0, None)

    assert cfg.patient_encoding is not None
    assert cfg.patient_encoding.patient_label == "PATIENT"
    assert cfg.patient_encoding.generate_hash is True

    adv = cfg.advanced_config
    assert adv is not None
    assert (adv.bag_size, adv.batch_size, adv.max_epochs, adv.patience) == (512, 64, 32, 16)
    assert adv.max_lr == 1e-4
    assert adv.div_factor == 25.0
    assert adv.num_workers == min(os.cpu_count() or 1, 16)
    assert adv.seed is None
    assert adv.model_name is None
    assert adv.model_params.vit.model_dump() == {
        "dim_model": 512,
        "dim_feedforward": 512,
        "n_heads": 8,
        "n_layers": 2,
        "dropout": 0.0,
        "use_alibi": False,
    }
    assert adv.model_params.mlp.model_dump() == {"dim_hidden": 512, "num_layers": 2, "dropout": 0.25}
    assert adv.model_params.barspoon.dim_feedforward == 2048


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.preprocessing is None and cfg.advanced_config is None
    assert cfg.orchestration.prefect_api_url is None


def test_ground_truth_label_may_be_a_list_for_multi_target(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, TRAINING_HEAD + "  ground_truth_label: [KRAS, BRAF]\n"))
    assert cfg.training is not None
    assert cfg.training.ground_truth_label == ["KRAS", "BRAF"]


def test_empty_model_params_blocks_mean_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "advanced_config:\n  model_params:\n    vit:\n    mlp:\n"))
    assert cfg.advanced_config is not None
    assert cfg.advanced_config.model_params.vit.n_heads == 8
    assert cfg.advanced_config.model_params.mlp.dropout == 0.25


def test_devices_and_accelerators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(write(tmp_path, PREPROCESSING_HEAD + "  device: cuda:1\n"))
    assert cfg.preprocessing is not None and cfg.preprocessing.device == "cuda:1"
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  device: gpu\n")
    assert "preprocessing.device: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'" in message

    monkeypatch.setattr(models, "_cuda_available", lambda: True)
    assert (resolve_device(None), resolve_accelerator(None)) == ("cuda", "gpu")
    monkeypatch.setattr(models, "_cuda_available", lambda: False)
    assert (resolve_device(None), resolve_accelerator(None)) == ("cpu", "cpu")
    assert (resolve_device("cuda:3"), resolve_accelerator("gpu")) == ("cuda:3", "gpu")


# --------------------------------------------------------------------------- dump / round trip


@pytest.mark.parametrize("source", ["stamp", "template", "minimal"])
def test_dump_then_load_round_trips(tmp_path: Path, source: str) -> None:
    if source == "stamp":
        original = load_config(STAMP_CONFIG)
    elif source == "template":
        original = load_config(write(tmp_path, template_text(), "template.yaml"))
    else:
        original = load_config(write(tmp_path, MINIMAL, "minimal.yaml"))
    text = dump_config(original)
    assert "!!" not in text  # plain YAML: no python tags for paths
    assert load_config(write(tmp_path, text, "dumped.yaml")) == original


def test_dump_writes_paths_as_strings_and_keeps_null_switches(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, PREPROCESSING_HEAD + "  brightness_cutoff: null\n"))
    text = dump_config(cfg)
    assert "  output_dir: /out\n" in text
    assert "brightness_cutoff: null" in text  # dropping it would turn the check back on
    assert "wsi_list" not in text  # None by default: left out
    reloaded = load_config(write(tmp_path, text, "dumped.yaml"))
    assert reloaded.preprocessing is not None and reloaded.preprocessing.brightness_cutoff is None


def test_dump_stamp_only_leaves_out_orchestration(tmp_path: Path) -> None:
    cfg = load_config(STAMP_CONFIG)
    assert "orchestration:" in dump_config(cfg)
    assert "orchestration" not in dump_config(cfg, stamp_only=True)


def test_section_yaml_and_require_section() -> None:
    cfg = load_config(STAMP_CONFIG)
    text = section_yaml(cfg, "heatmaps")
    assert text.startswith("heatmaps:\n")
    assert "  topk: 5\n" in text and "preprocessing" not in text
    empty = StampConfig()
    with pytest.raises(ConfigError, match="no 'training' section"):
        require_section(empty, "training")
    with pytest.raises(ConfigError, match="did you mean 'heatmaps'"):
        section_yaml(cfg, "heatmap")


def test_command_sections_cover_every_stage() -> None:
    from stamp.stages import STAGES

    assert {s.name for s in STAGES} == set(STAGE_NAMES)
    assert {s.section for s in STAGES} <= set(StampConfig.model_fields)


# --------------------------------------------------------------------------- template


def _all_models() -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [StampConfig]
    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.append(model)
        for info in model.model_fields.values():
            annotation = info.annotation
            for candidate in (annotation, *typing.get_args(annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    todo.append(candidate)
    return found


def test_template_loads_and_lists_every_key_of_every_model(tmp_path: Path) -> None:
    text = template_text()
    cfg = load_config(write(tmp_path, text))
    for section in StampConfig.model_fields:
        assert getattr(cfg, section) is not None, f"template lacks section {section}"
    keys_in_template = set(re.findall(r"^\s*#?\s*([a-z_0-9]+):", text, flags=re.MULTILINE))
    models_seen = _all_models()
    assert len(models_seen) >= 16
    for model in models_seen:
        missing = set(model.model_fields) - keys_in_template
        assert not missing, f"{model.__name__} keys missing from the template: {sorted(missing)}"
    assert "slide_list" not in keys_in_template  # STAMP's template misnames wsi_list
    assert "opacity = " not in text  # and writes opacity in invalid YAML


def test_template_shows_stamp_defaults() -> None:
    text = template_text()
    for line in (
        "#tile_size_um: 256.0",
        "#tile_size_px: 224",
        "#brightness_cutoff: 240",
        "#canny_cutoff: 0.02",
        "#max_workers: 8",
        "#n_splits: 5",
        "#opacity: 0.6",
        "#bag_size: 512",
        "#batch_size: 64",
        "#max_epochs: 32",
        "#patience: 16",
        "#div_factor: 25.0",
        "#task_concurrency: 2",
        "seed: 42",
    ):
        assert line in text


def test_write_template_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    write_template(target)
    assert target.read_text(encoding="utf-8") == template_text()

    target.write_text("preprocessing: {}\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="already exists"):
        write_template(target)
    assert target.read_text(encoding="utf-8") == "preprocessing: {}\n"


# --------------------------------------------------------------------------- error messages


def test_typo_names_file_dotted_key_and_closest_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  tile_size_pxx: 224\n")
    assert "config.yaml" in message
    assert "unknown key 'preprocessing.tile_size_pxx'" in message
    assert "did you mean 'tile_size_px'" in message
    assert "[line 6]" in message


def test_stamp_template_misnomer_slide_list_points_to_wsi_list(tmp_path: Path) -> None:
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  slide_list: list.csv\n")
    assert "unknown key 'preprocessing.slide_list' (did you mean 'wsi_list'?)" in message


def test_unknown_section_suggests_closest_section(tmp_path: Path) -> None:
    message = error_of(tmp_path, "heatmap:\n  topk: 5\n")
    assert "config.yaml: unknown section 'heatmap' (did you mean 'heatmaps'?)" in message


def test_unknown_nested_key_in_model_params(tmp_path: Path) -> None:
    message = error_of(tmp_path, "advanced_config:\n  model_params:\n    vit:\n      n_head: 4\n")
    assert "unknown key 'advanced_config.model_params.vit.n_head' (did you mean 'n_heads'?)" in message


def test_type_errors_name_the_expected_type(tmp_path: Path) -> None:
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  tile_size_px: abc\n  tile_size_um: big\n")
    assert "config.yaml: preprocessing.tile_size_px: expected an integer, got 'abc'" in message
    assert "config.yaml: preprocessing.tile_size_um: expected a number, got 'big'" in message
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  generate_hash: maybe\n")
    assert "preprocessing.generate_hash: expected true or false, got 'maybe'" in message
    message = error_of(tmp_path, "preprocessing: yes\n")
    assert "preprocessing: expected a mapping" in message


def test_enum_error_lists_allowed_values_and_suggests(tmp_path: Path) -> None:
    message = error_of(tmp_path, TRAINING_HEAD + "  task: clasification\n")
    assert (
        "training.task: expected one of 'classification', 'regression', 'survival', got 'clasification'"
        in message
    )
    assert "did you mean 'classification'" in message
    message = error_of(tmp_path, PREPROCESSING_HEAD.replace("ctranspath", "h_optimus_1"))
    assert "'h-optimus-1'" in message and "'red-dino'" in message and "'empty'" in message


def test_range_errors_name_the_allowed_range(tmp_path: Path) -> None:
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  canny_cutoff: 1.5\n  brightness_cutoff: 255\n")
    assert "preprocessing.canny_cutoff: must be in the range 0 < x < 1 (or null), got 1.5" in message
    assert "preprocessing.brightness_cutoff: must be in the range 0 < x < 255 (or null), got 255" in message
    text = """
        heatmaps:
          output_dir: /out
          feature_dir: /feats
          wsi_dir: /wsi
          checkpoint_path: /model.ckpt
          opacity: 1.5
        crossval:
          output_dir: /out
          clini_table: /clini.csv
          feature_dir: /feats
          n_splits: 1
        advanced_config:
          batch_size: 0
        """
    message = error_of(tmp_path, text)
    assert "heatmaps.opacity: must be in the range 0 <= x <= 1, got 1.5" in message
    assert "crossval.n_splits: must be in the range 2 <= x <= 100, got 1" in message
    assert "advanced_config.batch_size: must be in the range 1 <= x <= 4096, got 0" in message


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, "preprocessing:\n  output_dir: /out\n  wsi_dir: /wsi\n")
    assert "config.yaml: missing required key 'preprocessing.extractor'" in message


def test_one_line_per_problem_in_file_order(tmp_path: Path) -> None:
    message = error_of(tmp_path, PREPROCESSING_HEAD + "  tile_size_px: abc\n  canny_cutoff: 2\nheatmap: {}\n")
    lines = message.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(str(tmp_path / "config.yaml") + ": ") for line in lines)
    assert [re.search(r"\[line (\d+)\]", line).group(1) for line in lines] == ["6", "7", "8"]  # type: ignore[union-attr]


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nowhere.yaml")
    assert (
        str(info.value)
        == f"config file {tmp_path / 'nowhere.yaml'} not found; run `stamp init` to create one"
    )
    assert isinstance(info.value, ValueError)


def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "heatmaps:\n  opacity = 0.6\n  topk: 5\n")
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'config.yaml'}: line 3,")
    assert "invalid YAML" in message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "heatmaps:\n  topk: 5\n  topk: 6\n")
    assert "line 3" in message and "duplicate key 'topk'" in message


# --------------------------------------------------------------------------- orchestration


def test_orchestration_defaults_need_no_server(tmp_path: Path) -> None:
    cfg = load_config(STAMP_CONFIG)
    orch = cfg.orchestration
    assert orch.prefect_api_url is None
    assert orch.prefect_home is None
    assert orch.result_dir is None
    assert orch.task_concurrency == 2
    assert orch.deployments == {}


def test_orchestration_section_is_validated(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
            orchestration:
              prefect_api_url: http://prefect:4200/api
              result_dir: /results
              task_concurrency: 4
              deployments:
                preprocess: preprocess/gpu-docker
                heatmaps: heatmaps/slurm
            """,
        )
    )
    assert cfg.orchestration.prefect_api_url == "http://prefect:4200/api"
    assert cfg.orchestration.result_dir == Path("/results")
    assert cfg.orchestration.deployments == {
        "preprocess": "preprocess/gpu-docker",
        "heatmaps": "heatmaps/slurm",
    }

    message = error_of(
        tmp_path,
        "orchestration:\n  task_concurrency: 0\n  deployments:\n    trian: a/b\n    deploy: nodash\n",
    )
    assert "orchestration.task_concurrency: must be in the range 1 <= x <= 256, got 0" in message
    assert "orchestration.deployments: unknown key 'trian' (did you mean 'train'?)" in message
    assert "orchestration.deployments.deploy: expected a deployment name of the form" in message


# --------------------------------------------------------------------------- import cost


def test_import_pulls_in_neither_torch_nor_prefect() -> None:
    code = "import stamp.config, sys; assert 'torch' not in sys.modules and 'prefect' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
