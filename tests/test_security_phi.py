"""M12: with redaction on, slide names, patient data and images stay out of Prefect (UI, API, database).

Everything the API holds about a run is read back — task-run names, artifacts (tables and markdown) —
and searched for the slide names; the same run without redaction is the control that shows the names
would be there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from stamp.config_models import PreprocessingConfig
from stamp.synthetic import write_cohort

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phi-cohort")
    write_cohort(root, n_patients=2, seed=5, size=2048, variants=False)
    return root


def _everything_prefect_holds(flow_run_id: UUID) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        run = client.read_flow_run(flow_run_id)
    held: list[Any] = (
        [t.name for t in tasks] + [(a.key, a.description, a.data) for a in artifacts] + [run.name]
    )
    return json.dumps(held, default=str)


def _preprocess(cohort: Path, out: Path, redact: bool) -> tuple[dict[str, Any], UUID]:
    from prefect import flow

    from stamp_flows.phi import redaction_scope
    from stamp_flows.preprocess import preprocess_flow

    cfg = PreprocessingConfig(output_dir=out, wsi_dir=cohort / "slides", extractor="demo", max_workers=1)

    @flow(name="phi-probe")
    def probe() -> tuple[dict[str, Any], str]:
        from prefect.runtime import flow_run

        with redaction_scope(redact):  # what the cohort flow does for an INBOX cohort
            result = preprocess_flow(config=cfg.model_dump(mode="json"))
        return result, str(flow_run.id)

    result, parent = probe()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        (child,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent)])
            )
        )
    return result, child.id


def test_redacted_preprocess_keeps_slide_names_out_of_prefect(cohort: Path, tmp_path: Path) -> None:
    names = sorted(p.stem for p in (cohort / "slides").glob("*.svs"))
    assert names

    plain, plain_run = _preprocess(cohort, tmp_path / "plain", redact=False)
    held = _everything_prefect_holds(plain_run)
    assert all(name in held for name in names), "control: without redaction the names are in Prefect"

    redacted, redacted_run = _preprocess(cohort, tmp_path / "redacted", redact=True)
    held = _everything_prefect_holds(redacted_run)
    leaked = [name for name in names if name in held]
    assert leaked == [], f"slide names in Prefect: {leaked}"
    assert "preprocess-1" in held and "slide-1" in held
    # the details stay with the outputs, on the hospital's storage
    summary = (Path(redacted["feature_dir"]) / "summary.md").read_text()
    assert all(name in summary for name in names)
    assert sum(redacted["counts"].values()) == sum(plain["counts"].values()) == len(names)


def test_env_switch_turns_redaction_on_for_a_whole_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from stamp_flows.phi import artifact_rows, redacting, run_label

    monkeypatch.delenv("STAMP_REDACT_PHI", raising=False)
    assert not redacting() and run_label("heatmap", "TCGA-AA-1234", 3) == "heatmap-TCGA-AA-1234"
    monkeypatch.setenv("STAMP_REDACT_PHI", "1")
    assert redacting() and run_label("heatmap", "TCGA-AA-1234", 3) == "heatmap-3"
    rows = [{"slide": "TCGA-AA-1234", "status": "done", "reason": "", "overview": "/x/TCGA-AA-1234.png"}]
    assert artifact_rows(rows, "slide", ("reason", "overview")) == [{"slide": "slide-1", "status": "done"}]


def test_an_inbox_cohort_runs_its_stages_redacted(tmp_path: Path) -> None:
    """Default on for watcher runs: the cohort flow of a snapshot tags every stage run it starts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    from stamp_flows.phi import REDACT_TAG
    from stamp_flows.watch import WatchSettings
    from tests.test_inbox_cohort_flow import run, stats_cohort

    (tmp_path / "inbox").mkdir()
    settings = WatchSettings.create(
        tmp_path / "inbox", state_dir=tmp_path / "state", work_root=tmp_path / "work"
    )
    _, payload = stats_cohort(settings, name="c-phi")
    run(payload)
    with get_client(sync_client=True) as client:
        (cohort,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["cohort"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        stages = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[cohort.id]))
        )
    assert [s.name for s in stages] and all(REDACT_TAG in s.tags for s in stages), [
        (s.name, s.tags) for s in stages
    ]
