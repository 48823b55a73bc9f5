"""The synth and demo flows on a real (test) Prefect API: outputs, caching, artifacts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stamp.config import load_config

pytestmark = pytest.mark.usefixtures("prefect_api")


def _artifact(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def _read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )

    return asyncio.run(_read())


def test_synth_flow_writes_caches_and_regenerates(tmp_path: Path) -> None:
    from stamp_flows.synth import synth_flow

    out = tmp_path / "cohort"
    first = synth_flow(out=str(out), patients=3, seed=1, size=2048, variants=False)
    slides = [Path(p) for p in first["slides"]]
    assert slides and all(p.exists() for p in slides)
    assert (out / "clini.csv").read_text().startswith("PATIENT,")
    mtimes = {p: p.stat().st_mtime_ns for p in slides}

    second = synth_flow(out=str(out), patients=3, seed=1, size=2048, variants=False)
    assert second["slides"] == first["slides"]
    assert {p: p.stat().st_mtime_ns for p in slides} == mtimes, "an unchanged cohort must come from the cache"

    slides[0].unlink()
    synth_flow(out=str(out), patients=3, seed=1, size=2048, variants=False)
    assert slides[0].exists(), "a deleted output must be regenerated, not served from a stale cache entry"

    table = _artifact("synthetic-cohort")
    assert table, "the flow must publish its slide table as an artifact"


def test_demo_flow_report_and_config(tmp_path: Path) -> None:
    from stamp_flows.demo import demo_flow

    report = demo_flow(out=str(tmp_path / "demo"), patients=12, seed=0)
    assert "synthetic cohort" in report and "total" in report and "AUROC isMSIH=MSIH over 5 folds" in report
    assert "heatmap localisation:" in report and "% of the top-5 MSIH tiles" in report
    for stage in ("preprocess", "crossval", "statistics", "heatmaps"):
        assert f"    {stage}" in report, f"time of stage {stage} missing from the report"
    cfg = load_config(tmp_path / "demo" / "config.yaml")
    assert cfg.preprocessing is not None and cfg.preprocessing.extractor == "demo"
    assert Path(cfg.preprocessing.wsi_dir).is_dir()
    assert any(Path(cfg.preprocessing.wsi_dir).glob("*.svs"))
    assert _artifact("demo-report")
    assert cfg.crossval is not None and (Path(cfg.crossval.output_dir) / "splits.json").exists()
    assert len(list(Path(cfg.crossval.output_dir).glob("split-*/patient-preds.csv"))) == 5
    assert cfg.statistics is not None and cfg.heatmaps is not None
    assert (Path(cfg.statistics.output_dir) / "isMSIH_categorical-stats_aggregated.csv").is_file()
    assert (Path(cfg.statistics.output_dir) / "roc-curve_isMSIH=MSIH.png").is_file()
    overviews = list(Path(cfg.heatmaps.output_dir).glob("*/plots/overview-*.png"))
    assert len(overviews) == len(list(Path(cfg.preprocessing.wsi_dir).glob("*.svs")))
    for key in ("cohort-report", "statistics-metrics", "heatmaps-slides"):
        assert _artifact(key), f"artifact {key} missing"
