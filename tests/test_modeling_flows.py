"""train / crossval / deploy through real Prefect flow runs and the CLI: caching, artifacts, warnings."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stamp.cli import main
from tests.test_modeling_train import LABEL, Tiny, tiny_advanced, write_tiny_cohort

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return write_tiny_cohort(tmp_path_factory.mktemp("tiny-flows"), n_patients=24)


def _tables(tiny: Tiny) -> dict[str, str]:
    return {
        "clini_table": str(tiny.clini),
        "slide_table": str(tiny.slides),
        "feature_dir": str(tiny.features),
    }


def _artifact(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def _read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    return asyncio.run(_read())


def test_crossval_flow_caches_folds_and_publishes_metrics(tiny: Tiny, tmp_path: Path) -> None:
    from stamp.config_models import CrossvalConfig
    from stamp_flows.modeling import run_crossval_flow

    sec = CrossvalConfig(output_dir=tmp_path / "cv", ground_truth_label=LABEL, n_splits=3, **_tables(tiny))
    adv = tiny_advanced("abmil", max_epochs=4)
    first = run_crossval_flow(sec, adv)
    assert [f["fold"] for f in first["folds"]] == [0, 1, 2]
    assert all(0.0 <= f[f"auroc_{LABEL}"] <= 1.0 for f in first["folds"])
    preds = sorted((tmp_path / "cv").glob("split-*/patient-preds.csv"))
    assert len(preds) == 3 and (tmp_path / "cv" / "splits.json").exists()
    mtimes = [p.stat().st_mtime_ns for p in preds]
    second = run_crossval_flow(sec, adv)
    assert [p.stat().st_mtime_ns for p in preds] == mtimes, "unchanged folds must come from the cache"
    assert second["folds"] == first["folds"]
    assert f"auroc_{LABEL}" in second["summary"] and "95% CI" in second["summary"]
    assert _artifact("crossval-folds") and _artifact("crossval-summary")

    # a deleted fold output is recomputed (not handed back from a stale cache entry)
    preds[1].unlink()
    run_crossval_flow(sec, adv)
    assert preds[1].exists()


def test_cli_train_then_deploy_warns_on_training_patients(
    tiny: Tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adv = tiny_advanced("abmil", max_epochs=2).model_dump(mode="json")
    cfg = {
        "training": {"output_dir": str(tmp_path / "train"), "ground_truth_label": LABEL, **_tables(tiny)},
        "deployment": {
            "output_dir": str(tmp_path / "deploy"),
            "checkpoint_paths": [str(tmp_path / "train" / "model.ckpt")],
            **_tables(tiny),
        },
        "advanced_config": adv,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["-c", str(path), "train"]) == 0
    assert (tmp_path / "train" / "model.ckpt").exists() and (tmp_path / "train" / "logfile.log").exists()

    stamp_logger = logging.getLogger("stamp")
    stamp_logger.addHandler(caplog.handler)
    try:
        assert main(["-c", str(path), "deploy"]) == 0
    finally:
        stamp_logger.removeHandler(caplog.handler)
    leak = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert leak and "P" in leak[0].getMessage(), "deploying on training patients must warn loudly"
    table = pd.read_csv(tmp_path / "deploy" / "patient-preds.csv")
    assert list(table.columns)[:3] == ["PATIENT", LABEL, "pred"] and "loss" in table.columns
    assert len(table) == 24


def test_cli_crossval_without_section_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("preprocessing:\n  output_dir: o\n  wsi_dir: w\n  extractor: demo\n")
    assert main(["-c", str(path), "crossval"]) == 1
    assert "no 'crossval' section" in capsys.readouterr().err
