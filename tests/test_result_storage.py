"""Private JSON-only result storage (security review M6): planted pickle records are never loaded."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task
from prefect._internal.compatibility.blocks import (
    call_explicitly_async_block_method,
    call_explicitly_sync_block_method,
)
from prefect.cache_policies import INPUTS
from prefect.serializers import PickleSerializer
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from stamp_tasks.cache import content_cache_policy
from stamp_tasks.results import (
    RESULT_OPTIONS,
    RESULT_STORAGE,
    UnsafeResultStorageError,
    check_record,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

CALLS: list[int] = []


def expected(x: int) -> dict[str, Any]:
    return {"x": x, "square": x * x, "ok": True, "none": None, "path": f"/data/{x}", "f": x / 4}


@task(name="m6-probe", cache_policy=INPUTS, **RESULT_OPTIONS)
def probe(x: int) -> dict[str, Any]:
    CALLS.append(x)
    return expected(x)


@flow(name="m6-probe-flow")
def probe_flow(x: int) -> tuple[str, dict[str, Any]]:
    state = probe(x, return_state=True)
    return state.name, state.result()


class _Touch:
    """Unpickling this calls ``Path(marker).touch()`` — a harmless stand-in for ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_payload(marker: Path) -> str:
    return PickleSerializer().dumps(_Touch(marker)).decode()


def _records(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _planted(record: dict[str, Any], marker: Path) -> bytes:
    """The review's M6 reproduction: the stored record re-labelled as a pickle of a gadget."""
    bad = json.loads(json.dumps(record))
    bad["metadata"]["serializer"] = json.loads(PickleSerializer().model_dump_json())
    bad["result"] = _pickle_payload(marker)
    return json.dumps(bad).encode()


@pytest.fixture
def results(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "private" / "results"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: folder}):
        yield folder


def test_cache_round_trip_is_private_json(results: Path) -> None:
    CALLS.clear()
    assert probe_flow(101) == ("Completed", expected(101))
    name, value = probe_flow(101)
    assert (name, value, CALLS) == ("Cached", expected(101), [101])
    (record,) = _records(results)
    data = json.loads(record.read_bytes())
    assert data["metadata"]["serializer"]["type"] == "json"
    assert json.loads(data["result"])["square"] == 101 * 101
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(results.stat().st_mode) == 0o700
    assert stat.S_IMODE(results.parent.stat().st_mode) == 0o700  # parents made here are private too


def test_planted_pickle_record_is_not_loaded(results: Path, tmp_path: Path) -> None:
    # The payload is live: loading it the way Prefect would creates its marker.
    check = tmp_path / "payload-works"
    PickleSerializer().loads(_pickle_payload(check).encode())
    assert check.exists()

    CALLS.clear()
    assert probe_flow(202)[0] == "Completed"
    (record,) = _records(results)
    marker = tmp_path / "PWNED"
    record.write_bytes(_planted(json.loads(record.read_bytes()), marker))

    name, value = probe_flow(202)
    assert not marker.exists(), "a planted pickle record was unpickled"
    assert (name, CALLS) == ("Completed", [202, 202])  # the record was ignored and recomputed
    assert value == expected(202)
    data = json.loads(record.read_bytes())
    assert data["metadata"]["serializer"]["type"] == "json"
    assert probe_flow(202)[0] == "Cached"


def test_unsafe_folder_is_refused(results: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    CALLS.clear()
    probe_flow(303)
    (record,) = _records(results)
    marker = tmp_path / "PWNED"
    shared = tmp_path / "shared"
    shared.mkdir()
    planted = _planted(json.loads(record.read_bytes()), marker)
    (shared / record.name).write_bytes(planted)
    shared.chmod(0o777)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: shared}):
        with pytest.raises(UnsafeResultStorageError, match="writable by group or others") as err:
            RESULT_STORAGE.read_path(record.name)
        # In a flow, Prefect swallows the refused read (key absent) and logs the refused
        # write as an ERROR without failing the task: the task recomputes, nothing is cached.
        assert probe_flow(303) == ("Completed", expected(303))
    assert CALLS == [303, 303]
    assert "\n" not in str(err.value) and str(shared) in str(err.value)
    assert str(err.value) in caplog.text  # the one-line reason, logged by Prefect
    assert not marker.exists()
    assert (shared / record.name).read_bytes() == planted and len(list(shared.iterdir())) == 1
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # a folder we did not make is not chmod-ed

    link = tmp_path / "link"
    link.symlink_to(results)
    with (
        temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: link}),
        pytest.raises(UnsafeResultStorageError, match="symbolic link"),
    ):
        RESULT_STORAGE.read_path(record.name)


def test_read_paths_reject_unsafe_records(results: Path, tmp_path: Path) -> None:
    CALLS.clear()
    probe_flow(404)
    (record,) = _records(results)
    good = json.loads(record.read_bytes())
    marker = tmp_path / "PWNED"

    def variant(**serializer: Any) -> bytes:
        bad = json.loads(json.dumps(good))
        bad["metadata"]["serializer"].update(serializer)
        return json.dumps(bad).encode()

    popen = json.loads(json.dumps(good))  # JSON serializer whose object hook runs a command
    popen["metadata"]["serializer"]["object_decoder"] = "subprocess.Popen"
    popen["result"] = json.dumps({"touch": 0, str(marker): 0})
    foreign_class = json.loads(json.dumps(good))
    foreign_class["result"] = json.dumps({"__class__": "subprocess.Popen", "data": ["touch", str(marker)]})
    unsafe = {
        "pickle": _planted(good, marker),
        "jsonlib": variant(jsonlib="pickle", object_decoder=None),
        "popen": json.dumps(popen).encode(),
        "class": json.dumps(foreign_class).encode(),
        "raw-pickle": PickleSerializer().dumps(_Touch(marker)),
        "legacy": json.dumps({"data": _pickle_payload(marker), "serializer": {"type": "pickle"}}).encode(),
    }

    async def read_async(key: str) -> bytes:
        return await call_explicitly_async_block_method(RESULT_STORAGE, "read_path", (key,), {})

    async def read_dispatched(key: str) -> bytes:
        return await RESULT_STORAGE.read_path(key)  # async context: dispatches to aread_path

    assert check_record(record.read_bytes()) == RESULT_STORAGE.read_path(record.name)
    for name, content in unsafe.items():
        (results / name).write_bytes(content)
        with pytest.raises(ValueError):
            check_record(content)
        with pytest.raises(ValueError):
            call_explicitly_sync_block_method(RESULT_STORAGE, "read_path", (name,), {})
        with pytest.raises(ValueError):
            asyncio.run(read_async(name))
        with pytest.raises(ValueError):
            asyncio.run(read_dispatched(name))
    assert not marker.exists()
    with pytest.raises(ValueError, match="does not exist"):
        RESULT_STORAGE.read_path("missing")
    with pytest.raises(ValueError, match="outside"):
        RESULT_STORAGE.read_path("../escape")
    with pytest.raises(ValueError, match="serializer"):  # a task that forgot result_serializer="json"
        RESULT_STORAGE.write_path("pickled", _planted(good, marker))


def test_with_serializable_content_policy(results: Path, tmp_path: Path) -> None:
    # Our tasks' real policy: SERIALIZABLE isolation with file locks keyed relative to the storage.
    policy = content_cache_policy(
        "m6-test", content_args=(), lock_dir=tmp_path / "locks", digest_index_dir=tmp_path / "digests"
    )
    locked = probe.with_options(name="m6-probe-locked", cache_policy=policy)

    @flow(name="m6-locked-flow")
    def locked_flow(x: int) -> tuple[str, dict[str, Any]]:
        state = locked(x, return_state=True)
        return state.name, state.result()

    CALLS.clear()
    assert locked_flow(505) == ("Completed", expected(505))
    assert locked_flow(505) == ("Cached", expected(505))
    assert CALLS == [505]
    (record,) = _records(results)
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json"


def test_task_options_survive_with_options() -> None:
    # Prefect refuses unsaved (truthy) blocks in Task(); flows re-create tasks via with_options.
    again = probe.with_options(refresh_cache=True)
    assert again.result_storage is RESULT_STORAGE
    assert again.result_serializer == "json" and again.persist_result is True


def test_configure_prefect_makes_private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stamp_flows import runtime

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    monkeypatch.setattr(os, "environ", env)
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    home = existing / "a" / "prefect-home"
    result_dir = tmp_path / "results" / "run1"
    runtime.configure_prefect(prefect_home=home, result_dir=result_dir, api_url="http://127.0.0.1:9/api")
    for folder in (home, home.parent, result_dir, result_dir.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == str(result_dir)
    home.chmod(0o750)  # an existing PREFECT_HOME keeps its mode
    runtime.configure_prefect(prefect_home=home, api_url="http://127.0.0.1:9/api")
    assert stat.S_IMODE(home.stat().st_mode) == 0o750
