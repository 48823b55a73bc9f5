"""Hostile cohorts dropped in the INBOX (security review H3, M2, M3, M4, L5 and its t1/t7/t8 experiments).

Each test drops one attack next to a good cohort and checks three things a watcher admin relies on: the
watcher survives, the bad cohort gets an ``invalid`` record with a short reason that never echoes the file's
contents, and the good cohort is still emitted.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from stamp_flows.watch import READY_MARKER, WatchSettings, state_path, watch_once
from tests.test_watch import Recorder

SECRET = "HF_TOKEN=hf_SuperSecretValue0123456789"


@pytest.fixture
def settings(tmp_path: Path) -> WatchSettings:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "data").mkdir()
    return WatchSettings.create(
        tmp_path / "inbox",
        state_dir=tmp_path / "state" / "watch",
        work_root=tmp_path / "work",
        data_roots=[tmp_path / "data"],
        deployments=["preprocess/docker"],
    )


def good_config() -> dict[str, Any]:
    return {"preprocessing": {"output_dir": "features", "wsi_dir": "slides", "extractor": "demo"}}


def drop(inbox: Path, name: str, config: dict[str, Any] | str | bytes | None = None) -> Path:
    """A cohort folder with slides/, config.yaml (dict → YAML, str/bytes written as is) and READY."""
    folder = inbox / name
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    config = good_config() if config is None else config
    if isinstance(config, dict):
        config = yaml.safe_dump(config)
    data = config.encode() if isinstance(config, str) else config
    (folder / "config.yaml").write_bytes(data)
    (folder / READY_MARKER).touch()
    return folder


def record(settings: WatchSettings, name: str) -> dict[str, Any]:
    return json.loads(state_path(settings.state_dir, name).read_text())


def scan_with_a_good_neighbour(settings: WatchSettings, bad: str = "bad") -> tuple[dict[str, Any], Recorder]:
    """Drop ``zz-good`` (sorts after the bad one), scan; the good one must be emitted, the bad one recorded."""
    drop(settings.inbox, "zz-good")
    rec = Recorder()
    assert watch_once(settings, emit=rec) == ["zz-good"]
    assert [e.resource.id for e in rec.events] == ["stamp.cohort.zz-good"]
    data = record(settings, bad)
    assert data["status"] == "invalid"
    text = json.dumps(data)
    assert SECRET not in text and len(text) < 2000, text  # short, and no file contents
    assert watch_once(settings, emit=rec) == []  # recorded once, not retried every scan
    return data, rec


# ------------------------------------------------------------------------------------ t1 A: H3 + M4


def test_t1a_output_dir_outside_the_work_root_is_refused(settings: WatchSettings) -> None:
    cfg = good_config()
    cfg["preprocessing"]["output_dir"] = "/etc/stamp-evil"
    drop(settings.inbox, "bad", cfg)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "preprocessing.output_dir: output outside the cohort's work folder"
    assert "/etc/stamp-evil" not in json.dumps(data)


def test_t1a_wsi_dir_climbing_out_of_the_cohort_is_refused(settings: WatchSettings) -> None:
    cfg = good_config()
    cfg["preprocessing"]["wsi_dir"] = "../../../../var/lib"
    drop(settings.inbox, "bad", cfg)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "preprocessing.wsi_dir: input outside the cohort folder and the data roots"


def test_t1a_foreign_deployment_is_refused(settings: WatchSettings) -> None:
    cfg = good_config()
    cfg["orchestration"] = {"deployments": {"preprocess": "watch/process"}}
    drop(settings.inbox, "bad", cfg)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "orchestration.deployments.preprocess: deployment not allowed by the watcher"


def test_t1a_allow_listed_deployment_is_emitted(settings: WatchSettings) -> None:
    cfg = good_config()
    cfg["orchestration"] = {"deployments": {"preprocess": "preprocess/docker"}, "preprocess_shards": 4}
    drop(settings.inbox, "ok", cfg)
    assert watch_once(settings, emit=Recorder()) == ["ok"]


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("orchestration", "preprocess_shards"),
        ("orchestration", "task_concurrency"),
        ("preprocessing", "max_workers"),
    ],
)
def test_t1a_counts_of_100000_are_refused(settings: WatchSettings, section: str, key: str) -> None:
    cfg = good_config()
    cfg.setdefault(section, {})[key] = 100000
    drop(settings.inbox, "bad", cfg)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == f"{section}.{key}: out of range"


# ------------------------------------------------------------------------------------ t1 B, C, t1b: M2


def test_t1b_invalid_utf8_is_recorded_invalid(settings: WatchSettings) -> None:
    drop(settings.inbox, "bad", b"\xff\xfe" + SECRET.encode())
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "config.yaml is not UTF-8 text"


def test_t1c_deep_nesting_is_recorded_invalid(settings: WatchSettings) -> None:
    drop(settings.inbox, "bad", "[" * 20000 + "]" * 20000)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "config.yaml is nested too deeply"


def alias_bomb(levels: int = 9) -> str:
    """``ground_truth_label`` as a list of nested aliases: ``levels`` = 9 is 10^9 strings once expanded."""
    anchors = ['&a0 ["lol"]'] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)
    ]
    items = "\n".join(f"    - {a}" for a in anchors)
    return f"training:\n  output_dir: out\n  clini_table: c.csv\n  feature_dir: f\n  ground_truth_label:\n{items}\n"


def test_t1b_alias_bomb_is_refused_fast_and_small(settings: WatchSettings) -> None:
    drop(settings.inbox, "bad", alias_bomb(9))
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"].startswith("config.yaml: YAML aliases expand to more than")


def test_giant_config_is_refused_before_reading(settings: WatchSettings) -> None:
    drop(settings.inbox, "bad", "# " + "x" * (2 << 20) + "\n")
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "config.yaml is larger than 1 MiB"


# ------------------------------------------------------------------------------------ t1 E, t7, t8: M3


def test_t1e_symlinked_cohort_folder_is_not_followed(settings: WatchSettings, tmp_path: Path) -> None:
    outside = drop(tmp_path, "outside")
    (settings.inbox / "bad").symlink_to(outside, target_is_directory=True)
    data, rec = scan_with_a_good_neighbour(settings)
    assert data["error"] == "cohort folder is a symbolic link; not followed"
    assert all(str(outside) not in json.dumps(e.payload) for e in rec.events)


def test_t7_symlinked_config_is_not_read(settings: WatchSettings, tmp_path: Path) -> None:
    secret = tmp_path / "secrets.env"
    secret.write_text(SECRET + "\n")
    folder = drop(settings.inbox, "bad")
    (folder / "config.yaml").unlink()
    (folder / "config.yaml").symlink_to(secret)
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "config.yaml is a symbolic link or not a regular file"


def test_symlinked_or_special_ready_is_refused(settings: WatchSettings, tmp_path: Path) -> None:
    folder = drop(settings.inbox, "bad")
    (folder / READY_MARKER).unlink()
    (folder / READY_MARKER).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").touch()
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "READY is a symbolic link or not a regular file"


def test_fifo_config_does_not_block_the_watcher(settings: WatchSettings) -> None:
    folder = drop(settings.inbox, "bad")
    (folder / "config.yaml").unlink()
    os.mkfifo(folder / "config.yaml")
    data, _ = scan_with_a_good_neighbour(settings)
    assert data["error"] == "config.yaml is a symbolic link or not a regular file"


def test_t8_state_lives_outside_the_inbox(settings: WatchSettings, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "planted.json").write_text('{"status": "emitted"}')
    (settings.inbox / ".stamp-watch").symlink_to(elsewhere, target_is_directory=True)
    drop(settings.inbox, "planted")
    assert watch_once(settings, emit=Recorder()) == ["planted"]  # a planted record suppresses nothing
    assert sorted(p.name for p in elsewhere.iterdir()) == ["planted.json"]  # nothing written there
    assert not any(p.name.endswith(".json") for p in settings.inbox.rglob("*") if not p.is_symlink())
    rec = record(settings, "planted")
    assert stat.S_IMODE(os.stat(settings.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rec["snapshot_path"]).st_mode) == 0o600


def test_unsafe_state_dirs_are_refused(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with pytest.raises(ValueError, match=r"state folder .* inside the inbox"):
        WatchSettings.create(inbox, state_dir=inbox / ".stamp-watch", work_root=tmp_path / "work")
    with pytest.raises(ValueError, match=r"work root .* inside the inbox"):
        WatchSettings.create(inbox, state_dir=tmp_path / "state", work_root=inbox / "out")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target", target_is_directory=True)
    with pytest.raises(ValueError, match=r"state folder .*link is a symbolic link"):
        WatchSettings.create(inbox, state_dir=tmp_path / "link", work_root=tmp_path / "work")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match=r"state folder .*shared is writable by group or others"):
        WatchSettings.create(inbox, state_dir=shared, work_root=tmp_path / "work")
