"""Paths of a watcher-started cohort are confined (security review H3, M4; experiments t1 A and t2).

Inputs must resolve (symlinks followed, ``..`` normalised) under the cohort folder, its work folder or an
allow-listed data root; outputs under the cohort's work folder. Table entries (wsi_list, slide-table
FILENAME, heatmaps slide_paths) are checked too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp.config import ConfigError, load_config
from stamp.config_models import StampConfig
from stamp.confinement import Confinement, check_tables, confine_config, enforced
from stamp.slides.discovery import find_slides


@pytest.fixture
def conf(tmp_path: Path) -> Confinement:
    cohort = tmp_path / "inbox" / "c1"
    (cohort / "slides").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "outside").mkdir()
    return Confinement(
        cohort_dir=cohort,
        work_dir=tmp_path / "work" / "c1",
        data_roots=(tmp_path / "data",),
        deployments=frozenset({"preprocess/docker"}),
    )


def config(**sections: dict[str, Any]) -> StampConfig:
    return StampConfig.model_validate(sections)


def pre(**keys: Any) -> dict[str, Any]:
    return {"output_dir": "features", "wsi_dir": "slides", "extractor": "demo", **keys}


def crossval(**keys: Any) -> dict[str, Any]:
    return {"output_dir": "crossval", "clini_table": "clini.csv", "feature_dir": "features", **keys}


# ------------------------------------------------------------------------------------ resolving


def test_relative_outputs_go_under_the_work_folder_and_inputs_under_the_cohort(conf: Confinement) -> None:
    cfg = confine_config(config(preprocessing=pre(), crossval=crossval(slide_table="slides.csv")), conf)
    assert cfg.preprocessing is not None and cfg.crossval is not None
    assert cfg.preprocessing.output_dir == conf.work_dir / "features"
    assert cfg.preprocessing.wsi_dir == conf.cohort_dir / "slides"
    # an input under one of this config's relative outputs is that output (stages chain)
    assert cfg.crossval.feature_dir == conf.work_dir / "features"
    assert cfg.crossval.clini_table == conf.cohort_dir / "clini.csv"
    assert cfg.crossval.slide_table == conf.cohort_dir / "slides.csv"


def test_statistics_read_the_crossval_output_in_the_work_folder(conf: Confinement) -> None:
    stats = {"output_dir": "stats", "pred_csvs": ["crossval/split-0/patient-preds.csv"]}
    cfg = confine_config(config(crossval=crossval(), statistics=stats), conf)
    assert cfg.statistics is not None
    assert cfg.statistics.pred_csvs == [conf.work_dir / "crossval" / "split-0" / "patient-preds.csv"]


def test_absolute_output_inside_the_work_folder_is_kept(conf: Confinement) -> None:
    cfg = confine_config(config(preprocessing=pre(output_dir=str(conf.work_dir / "feats"))), conf)
    assert cfg.preprocessing is not None and cfg.preprocessing.output_dir == conf.work_dir / "feats"


def test_output_dir_outside_the_work_folder_is_refused(conf: Confinement) -> None:
    with pytest.raises(ConfigError) as err:
        confine_config(config(preprocessing=pre(output_dir="/etc/stamp-evil")), conf)
    assert str(err.value) == (
        f"preprocessing.output_dir: /etc/stamp-evil resolves to /etc/stamp-evil, outside the cohort's work "
        f"folder {conf.work_dir}; use a relative path (it goes under the work folder)"
    )
    assert err.value.summary == ["preprocessing.output_dir: output outside the cohort's work folder"]


def test_relative_output_climbing_out_of_the_work_folder_is_refused(conf: Confinement) -> None:
    with pytest.raises(
        ConfigError, match=r"^crossval\.output_dir: \.\./c2/crossval resolves to .*work/c2/crossval"
    ):
        confine_config(config(crossval=crossval(output_dir="../c2/crossval")), conf)


def test_wsi_dir_climbing_out_of_the_cohort_is_refused(conf: Confinement) -> None:
    with pytest.raises(ConfigError) as err:
        confine_config(config(preprocessing=pre(wsi_dir="../../../../var/lib")), conf)
    resolved = os.path.realpath(conf.cohort_dir / "../../../../var/lib")
    assert str(err.value).startswith(
        f"preprocessing.wsi_dir: ../../../../var/lib resolves to {resolved}, outside "
    )
    assert "ask IT to allow-list" in str(err.value)
    assert err.value.summary == ["preprocessing.wsi_dir: input outside the cohort folder and the data roots"]


def test_weights_dir_from_a_dropped_config_is_confined(conf: Confinement, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"^preprocessing\.weights_dir: /opt/weights resolves to /opt/weights"
    ):
        confine_config(config(preprocessing=pre(weights_dir="/opt/weights")), conf)
    inside = str(tmp_path / "data" / "weights")
    cfg = confine_config(config(preprocessing=pre(weights_dir=inside)), conf)
    assert cfg.preprocessing is not None and cfg.preprocessing.weights_dir == Path(inside)


def test_heatmaps_slide_paths_escaping_are_refused(conf: Confinement) -> None:
    section = {
        "output_dir": "heatmaps",
        "feature_dir": "features",
        "wsi_dir": "slides",
        "checkpoint_path": "crossval/split-0/model.ckpt",
        "slide_paths": ["a.svs", "../../../../etc/passwd"],
    }
    with pytest.raises(ConfigError) as err:
        confine_config(config(crossval=crossval(), heatmaps=section), conf)
    resolved = os.path.realpath(conf.cohort_dir / "slides/../../../../etc/passwd")
    assert str(err.value).startswith(
        f"heatmaps.slide_paths[1]: ../../../../etc/passwd resolves to {resolved}, outside"
    )
    section["slide_paths"] = ["/etc/hostname"]
    with pytest.raises(ConfigError, match=r"^heatmaps\.slide_paths\[0\]: /etc/hostname resolves"):
        confine_config(config(crossval=crossval(), heatmaps=section), conf)
    section["slide_paths"] = ["sub/a.svs"]
    cfg = confine_config(config(crossval=crossval(), heatmaps=section), conf)
    assert cfg.heatmaps is not None and cfg.heatmaps.slide_paths == [
        conf.cohort_dir / "slides" / "sub" / "a.svs"
    ]
    assert cfg.heatmaps.checkpoint_path == conf.work_dir / "crossval" / "split-0" / "model.ckpt"


# ------------------------------------------------------------------------------------ symlinks


def test_symlinked_slide_folder_pointing_outside_is_refused(conf: Confinement, tmp_path: Path) -> None:
    (conf.cohort_dir / "slides").rmdir()
    (conf.cohort_dir / "slides").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(
        ConfigError, match=rf"^preprocessing\.wsi_dir: slides resolves to {tmp_path}/outside, outside"
    ):
        confine_config(config(preprocessing=pre()), conf)


def test_symlink_into_an_allow_listed_data_root_is_accepted(conf: Confinement, tmp_path: Path) -> None:
    (tmp_path / "data" / "slides").mkdir()
    (tmp_path / "data" / "slides" / "a.svs").write_bytes(b"x")
    (conf.cohort_dir / "slides").rmdir()
    (conf.cohort_dir / "slides").symlink_to(tmp_path / "data" / "slides", target_is_directory=True)
    cfg = confine_config(config(preprocessing=pre()), conf)
    assert cfg.preprocessing is not None and cfg.preprocessing.wsi_dir == tmp_path / "data" / "slides"
    check_tables(cfg, conf)  # the slides found there are fine too


def test_symlinked_slide_inside_the_cohort_pointing_outside_is_refused(
    conf: Confinement, tmp_path: Path
) -> None:
    (tmp_path / "outside" / "other.svs").write_bytes(b"x")
    (conf.cohort_dir / "slides" / "mine.svs").symlink_to(tmp_path / "outside" / "other.svs")
    cfg = confine_config(config(preprocessing=pre()), conf)
    with pytest.raises(ConfigError, match=r"^slide .*mine\.svs resolves to .*outside/other\.svs, outside"):
        check_tables(cfg, conf)
    assert cfg.preprocessing is not None
    with enforced(conf), pytest.raises(ConfigError, match="mine.svs"):  # and when the stage reads them
        find_slides(cfg.preprocessing.wsi_dir)
    assert find_slides(cfg.preprocessing.wsi_dir)  # not enforced outside a watcher run


# ------------------------------------------------------------------------------------ tables


def test_wsi_list_entries_outside_the_cohort_are_refused(conf: Confinement) -> None:
    lst = conf.cohort_dir / "slides.txt"
    cfg = confine_config(config(preprocessing=pre(wsi_list="slides.txt")), conf)
    climbing = os.path.realpath(conf.cohort_dir / "slides/../../../../etc/hostname")
    for entry, resolved in (("/etc/passwd", "/etc/passwd"), ("../../../../etc/hostname", climbing)):
        lst.write_text(f"ok.svs\n{entry}\n")
        with pytest.raises(ConfigError) as err:
            check_tables(cfg, conf)
        assert str(err.value).startswith(
            f"{lst}: entry '{entry}' resolves to {resolved}, outside the cohort folder"
        )
        assert cfg.preprocessing is not None
        with enforced(conf), pytest.raises(ConfigError, match=f"entry '{entry}'"):
            find_slides(cfg.preprocessing.wsi_dir, cfg.preprocessing.wsi_list)
    lst.write_text("ok.svs\nsub/b.svs\n")
    check_tables(cfg, conf)


def test_slide_table_filename_escaping_is_refused(conf: Confinement) -> None:
    (conf.cohort_dir / "clini.csv").write_text("PATIENT,isMSIH\np1,MSIH\np2,nonMSIH\n")
    table = conf.cohort_dir / "slides.csv"
    table.write_text("PATIENT,FILENAME\np1,a.h5\np2,../../c2/features/stolen.h5\n")
    cfg = confine_config(config(preprocessing=pre(), crossval=crossval(slide_table="slides.csv")), conf)
    with pytest.raises(ConfigError) as err:
        check_tables(cfg, conf)
    assert str(err.value).startswith(
        f"{table}: FILENAME '../../c2/features/stolen.h5' resolves to {conf.work_dir.parent}/c2/features/stolen.h5, outside"
    )
    table.write_text("PATIENT,FILENAME\np1,a.h5\np2,sub/b\n")
    check_tables(cfg, conf)


# ------------------------------------------------------------------------------------ orchestration (M4)


def test_foreign_deployment_is_refused_and_allowed_one_kept(conf: Confinement) -> None:
    foreign = {
        "deployments": {"preprocess": "preprocess/docker", "heatmaps": "some-other-team/their-deployment"}
    }
    with pytest.raises(ConfigError) as err:
        confine_config(config(preprocessing=pre(), orchestration=foreign), conf)
    assert str(err.value) == (
        "orchestration.deployments.heatmaps: deployment 'some-other-team/their-deployment' is not allowed for "
        "INBOX cohorts (allowed: preprocess/docker); ask IT to allow it (`stamp watch --allow-deployment`)"
    )
    assert err.value.summary == ["orchestration.deployments.heatmaps: deployment not allowed by the watcher"]
    ok = {"deployments": {"preprocess": "preprocess/docker"}, "preprocess_shards": 3}
    cfg = confine_config(config(preprocessing=pre(), orchestration=ok), conf)
    assert cfg.orchestration.deployments == {"preprocess": "preprocess/docker"}
    assert cfg.orchestration.preprocess_shards == 3


def test_server_and_storage_settings_of_a_dropped_config_are_ignored(conf: Confinement) -> None:
    orch = {"prefect_api_url": "http://evil:4200/api", "prefect_home": "/tmp/x", "result_dir": "/tmp/y"}
    cfg = confine_config(config(preprocessing=pre(), orchestration=orch), conf)
    assert (
        cfg.orchestration.prefect_api_url,
        cfg.orchestration.prefect_home,
        cfg.orchestration.result_dir,
    ) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("section", "key", "bound"),
    [
        ("orchestration", "preprocess_shards", "1 <= x <= 1024"),
        ("orchestration", "task_concurrency", "1 <= x <= 256"),
        ("preprocessing", "max_workers", "1 <= x <= 256"),
        ("preprocessing", "batch_size", "1 <= x <= 4096"),
        ("advanced_config", "bag_size", "1 <= x <= 65536"),
        ("advanced_config", "num_workers", "0 <= x <= 256"),
        ("advanced_config", "max_epochs", "1 <= x <= 10000"),
        ("crossval", "n_splits", "2 <= x <= 100"),
        ("heatmaps", "topk", "0 <= x <= 10000"),
    ],
)
def test_counts_of_100000_are_refused(tmp_path: Path, section: str, key: str, bound: str) -> None:
    sections: dict[str, Any] = {
        "preprocessing": pre(),
        "crossval": crossval(),
        "heatmaps": {"output_dir": "h", "feature_dir": "f", "wsi_dir": "s", "checkpoint_path": "m.ckpt"},
        "advanced_config": {},
        "orchestration": {},
    }
    sections[section][key] = 100000
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(sections))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{section}.{key}: must be in the range {bound}, got 100000" in str(err.value)


def test_deployment_timeout_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("orchestration:\n  deployment_timeout_s: 1e12\n")
    with pytest.raises(ConfigError, match=r"orchestration\.deployment_timeout_s: must be in the range"):
        load_config(path)


# ------------------------------------------------------------------------------------ loading (M2)


def test_alias_bomb_in_a_label_is_refused_fast_and_small(tmp_path: Path) -> None:
    from tests.test_inbox_watch import alias_bomb

    path = tmp_path / "config.yaml"
    path.write_text(alias_bomb(9))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.monotonic() - t0 < 5
    assert len(str(err.value)) < 300
    assert "YAML aliases expand to more than 10000 values" in str(err.value)


def test_a_few_anchors_still_load(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "preprocessing:\n  output_dir: &feats /data/features\n  wsi_dir: /data/slides\n  extractor: demo\n"
        "crossval:\n  output_dir: /data/cv\n  clini_table: /data/c.csv\n  feature_dir: *feats\n"
    )
    cfg = load_config(path)
    assert cfg.crossval is not None and cfg.crossval.feature_dir == Path("/data/features")


def test_huge_label_value_is_not_formatted_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "training:\n  output_dir: o\n  clini_table: c.csv\n  feature_dir: f\n"
        f"  ground_truth_label: [{', '.join(['[1, 2, 3]'] * 20000)}]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.ground_truth_label: expected a column name" in str(err.value)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe" + b"preprocessing: {}\n", "not UTF-8 text"),
        (b"[" * 20000 + b"]" * 20000, "nested too deeply"),
        (b"# " + b"x" * (2 << 20), "larger than 1 MiB"),
    ],
    ids=["invalid-utf8", "deep-nesting", "giant"],
)
def test_unreadable_configs_are_one_line_config_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
