"""The ``cohort`` flow runs the watcher's snapshot of an INBOX config, confined (security review L5, H3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp.config import ConfigError
from stamp_flows.cohort import cohort_flow
from stamp_flows.watch import WatchSettings, state_path, watch_once
from tests.test_inbox_watch import Recorder, drop
from tests.test_report_flows import write_fold_preds

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def settings(tmp_path: Path) -> WatchSettings:
    (tmp_path / "inbox").mkdir()
    return WatchSettings.create(tmp_path / "inbox", state_dir=tmp_path / "state", work_root=tmp_path / "work")


def stats_cohort(settings: WatchSettings, name: str = "c7") -> tuple[Path, dict[str, Any]]:
    """A cohort whose statistics read its own prediction files; emitted by the watcher."""
    folder = settings.inbox / name
    write_fold_preds(folder / "cv", folds=2)
    stats = {
        "output_dir": "stats",
        "pred_csvs": ["cv/split-0/patient-preds.csv", "cv/split-1/patient-preds.csv"],
        "ground_truth_label": "isMSIH",
    }
    drop(settings.inbox, name, {"statistics": stats})
    rec = Recorder()
    assert watch_once(settings, emit=rec) == [name]
    return folder, rec.events[0].payload


def run(payload: dict[str, Any]) -> dict[str, Any]:
    return cohort_flow(snapshot_path=payload["snapshot_path"], snapshot_sha256=payload["snapshot_sha256"])


def test_watcher_run_reads_the_cohort_folder_and_writes_under_its_work_folder(
    settings: WatchSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, payload = stats_cohort(settings)
    monkeypatch.chdir(tmp_path)  # anywhere but the cohort folder
    result = run(payload)
    assert (settings.work_root / "c7" / "stats" / "isMSIH_categorical-stats_aggregated.csv").is_file()
    assert not (folder / "stats").exists() and not (tmp_path / "stats").exists()
    assert str(folder / "config.yaml") in result["config"]


def test_l5_config_swapped_after_validation_is_not_what_runs(settings: WatchSettings, tmp_path: Path) -> None:
    folder, payload = stats_cohort(settings)
    evil = tmp_path / "evil"
    swapped = {
        "statistics": {"output_dir": str(evil), "pred_csvs": ["/etc/passwd"], "ground_truth_label": "x"}
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(swapped))  # after the watcher validated it
    run(payload)
    assert not evil.exists()
    assert (settings.work_root / "c7" / "stats" / "isMSIH_categorical-stats_aggregated.csv").is_file()


def test_l5_a_changed_snapshot_is_refused_with_one_line(settings: WatchSettings) -> None:
    _, payload = stats_cohort(settings)
    snapshot = Path(payload["snapshot_path"])
    data = json.loads(snapshot.read_text())
    data["work_dir"] = "/tmp"
    snapshot.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        run(payload)
    message = str(err.value)
    assert "\n" not in message
    assert (
        message.startswith(f"{snapshot}: sha256 is ")
        and f"the event says {payload['snapshot_sha256']}" in message
    )
    assert not (settings.work_root / "c7").exists()  # nothing ran


def test_a_forged_snapshot_outside_the_state_folder_is_refused(
    settings: WatchSettings, tmp_path: Path
) -> None:
    _, payload = stats_cohort(settings)
    forged = tmp_path / "inbox" / "forged.json"  # a folder droppers can write
    forged.write_bytes(Path(payload["snapshot_path"]).read_bytes())
    (tmp_path / "inbox").chmod(0o777)
    with pytest.raises(ConfigError, match=r"forged\.json: its folder is writable by group or others"):
        cohort_flow(snapshot_path=str(forged), snapshot_sha256=payload["snapshot_sha256"])


def test_a_wsi_list_escaping_stops_the_run_before_any_stage(settings: WatchSettings) -> None:
    folder = drop(
        settings.inbox,
        "c8",
        {
            "preprocessing": {
                "output_dir": "features",
                "wsi_dir": "slides",
                "wsi_list": "list.txt",
                "extractor": "demo",
            }
        },
    )
    (folder / "list.txt").write_text("a.svs\n")
    rec = Recorder()
    assert watch_once(settings, emit=rec) == ["c8"]
    (folder / "list.txt").write_text("a.svs\n/etc/passwd\n")  # changed after the watcher looked
    with pytest.raises(ConfigError, match=r"list\.txt: entry '/etc/passwd' resolves to /etc/passwd, outside"):
        run(rec.events[0].payload)
    assert not (settings.work_root / "c8" / "features").exists()
    assert json.loads(state_path(settings.state_dir, "c8").read_text())["status"] == "emitted"
