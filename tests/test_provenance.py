"""Provenance records and durable file primitives on plain temp files (no Prefect, no slides).

DESIGN contract 4: an output is reused only when its own recorded provenance equals what this run
would write; something at an output path that we did not write (no record of ours, or a record
about another subject) is never replaced or deleted: that item fails with one line naming the path.
Security review findings covered here: M5 / L4 (trust in what is on disk), H2 (folders replaced
without a marker), L1 (predictable temp names follow symlinks), L3 (no fsync, temps never swept).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stamp import fileio
from stamp.fileio import (
    atomic_path,
    atomic_write_text,
    publish_dir,
    staged_file,
    staging_dir,
    sweep_temps,
)
from stamp.provenance import (
    FOLDER_RECORD,
    ForeignOutput,
    Provenance,
    Subject,
    Verdict,
    check_files,
    check_folder,
    publish_files,
    publish_folder,
    read_record,
    record_path,
)
from tests.conftest import leftover_temps

UNIT = "result.csv"


def _prov(x: int = 1, a: str = "sha-a", code: str = "code-1", weights: str | None = None) -> Provenance:
    return Provenance(stage="unit", inputs={"a": a}, settings={"x": x, "nested": {"y": 2}}, code=code,
                      weights=weights)  # fmt: skip


def _staged(folder: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """Temp files beside their final names, as a stage stages them before :func:`publish_files`."""
    out = {}
    for name, data in files.items():
        tmp = staged_file(folder / name)
        tmp.write_bytes(data)
        out[name] = tmp
    return out


def _publish(
    folder: Path, files: dict[str, bytes], prov: Provenance, subject: Subject | None = None
) -> dict[str, str]:
    return publish_files(folder, UNIT, _staged(folder, files), prov, subject=subject)


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name → bytes)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- file units


def test_absent_then_published_then_reused(tmp_path: Path) -> None:
    """M5/L4: reuse only with a record whose key and file digests match (not because files exist)."""
    names = [UNIT, "plot.png"]
    assert check_files(tmp_path, UNIT, names, _prov()).verdict is Verdict.ABSENT
    files = {UNIT: b"a,b\n1,2\n", "plot.png": b"\x89PNG fake"}
    digests = _publish(tmp_path, files, _prov())
    assert digests == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    record = read_record(record_path(tmp_path, UNIT))
    assert record is not None and record.key == _prov().key and record.outputs == digests
    check = check_files(tmp_path, UNIT, names, _prov())
    assert check.verdict is Verdict.REUSE and check.reusable
    assert not leftover_temps(tmp_path)


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        (_prov(x=2), "settings.x"),
        (_prov(a="sha-other"), "inputs.a"),
        (_prov(code="code-2"), "code changed"),
        (_prov(weights="w2"), "weights changed"),
        (
            Provenance(
                stage="unit", inputs={"a": "sha-a"}, settings={"x": 1, "nested": {"y": 3}}, code="code-1"
            ),
            "settings.nested.y",
        ),
    ],
)
def test_changed_input_or_setting_is_stale_and_says_what_changed(
    tmp_path: Path, changed: Provenance, named: str
) -> None:
    """H5/M5: a changed input, setting, code or weights is never reused; the reason names it."""
    _publish(tmp_path, {UNIT: b"old"}, _prov())
    check = check_files(tmp_path, UNIT, [UNIT], changed)
    assert check.verdict is Verdict.STALE and named in check.reason, check.reason
    # stale outputs are ours: the new result replaces them
    _publish(tmp_path, {UNIT: b"new"}, changed)
    assert (tmp_path / UNIT).read_bytes() == b"new"
    assert check_files(tmp_path, UNIT, [UNIT], changed).reusable


def test_file_edited_or_removed_after_publishing_is_stale(tmp_path: Path) -> None:
    """L4: a file whose bytes are not the recorded ones is not reused, even with a matching record."""
    _publish(tmp_path, {UNIT: b"1,2,3\n", "plot.png": b"png"}, _prov())
    (tmp_path / UNIT).write_bytes(b"1,2,3,4,5\n")
    check = check_files(tmp_path, UNIT, [UNIT, "plot.png"], _prov())
    assert check.verdict is Verdict.STALE and check.reason == f"{UNIT} changed since it was written"
    _publish(tmp_path, {UNIT: b"1,2,3\n", "plot.png": b"png"}, _prov())
    (tmp_path / "plot.png").unlink()
    check = check_files(tmp_path, UNIT, [UNIT, "plot.png"], _prov())
    assert check.verdict is Verdict.STALE and "plot.png is missing" in check.reason


def test_foreign_file_at_an_output_name_is_never_replaced(tmp_path: Path) -> None:
    """M5/H2: a file we did not write fails the unit with one line naming it; its bytes stay."""
    foreign = tmp_path / UNIT
    foreign.write_bytes(b"someone's results, not ours\n")
    check = check_files(tmp_path, UNIT, [UNIT], _prov())
    assert check.verdict is Verdict.FOREIGN and str(foreign) in check.reason and "\n" not in check.reason
    staged = _staged(tmp_path, {UNIT: b"ours"})
    with pytest.raises(ForeignOutput, match="not written by stamp") as e:
        publish_files(tmp_path, UNIT, staged, _prov())
    assert str(foreign) in str(e.value)
    assert foreign.read_bytes() == b"someone's results, not ours\n"
    assert not record_path(tmp_path, UNIT).exists(), "no record may claim the foreign file"
    assert staged[UNIT].read_bytes() == b"ours", "nothing was moved; the caller removes its temp"


def test_foreign_file_beside_our_record_is_never_replaced(tmp_path: Path) -> None:
    """M5: our record covers only the files it lists; a new name of the unit that is foreign fails."""
    _publish(tmp_path, {UNIT: b"ours"}, _prov())
    other = tmp_path / "plot.png"
    other.write_bytes(b"a user's picture")
    check = check_files(tmp_path, UNIT, [UNIT, "plot.png"], _prov(x=2))
    assert check.verdict is Verdict.FOREIGN and str(other) in check.reason
    with pytest.raises(ForeignOutput, match="plot.png"):
        _publish(tmp_path, {UNIT: b"new", "plot.png": b"png"}, _prov(x=2))
    assert other.read_bytes() == b"a user's picture" and (tmp_path / UNIT).read_bytes() == b"ours"


def test_a_symlink_at_an_output_name_is_foreign(tmp_path: Path) -> None:
    """L1/M5: a planted symlink is neither followed nor replaced."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim")
    out = tmp_path / "out"
    out.mkdir()
    (out / UNIT).symlink_to(victim)
    assert check_files(out, UNIT, [UNIT], _prov()).verdict is Verdict.FOREIGN
    with pytest.raises(ForeignOutput, match=UNIT):
        _publish(out, {UNIT: b"ours"}, _prov())
    assert (out / UNIT).is_symlink() and victim.read_bytes() == b"victim"


def test_record_about_another_subject_is_foreign(tmp_path: Path) -> None:
    """M5: two inputs mapping to one output (same name in two folders) never overwrite each other."""
    a = Subject("/data/A/s1.svs", "sha-A")
    b = Subject("/data/B/s1.svs", "sha-B")
    _publish(tmp_path, {UNIT: b"features of A"}, _prov(a="sha-A"), subject=a)
    check = check_files(tmp_path, UNIT, [UNIT], _prov(a="sha-B"), subject=b)
    assert check.verdict is Verdict.FOREIGN
    assert "/data/A/s1.svs" in check.reason and "/data/B/s1.svs" in check.reason
    with pytest.raises(ForeignOutput, match="holds the output of /data/A/s1.svs"):
        _publish(tmp_path, {UNIT: b"features of B"}, _prov(a="sha-B"), subject=b)
    assert (tmp_path / UNIT).read_bytes() == b"features of A"
    # the same slide moved elsewhere (same bytes) is the same subject: reused
    moved = Subject("/data/new/s1.svs", "sha-A")
    assert check_files(tmp_path, UNIT, [UNIT], _prov(a="sha-A"), subject=moved).reusable


def test_files_of_the_previous_record_not_in_the_new_unit_are_removed(tmp_path: Path) -> None:
    """H5: stale files of ours are not left beside the new unit; files not ours are kept."""
    _publish(tmp_path, {UNIT: b"v1", "old-plot.png": b"png v1"}, _prov())
    (tmp_path / "notes.txt").write_bytes(b"a user's notes")
    _publish(tmp_path, {UNIT: b"v2"}, _prov(x=2))
    assert not (tmp_path / "old-plot.png").exists()
    assert (tmp_path / UNIT).read_bytes() == b"v2" and (
        tmp_path / "notes.txt"
    ).read_bytes() == b"a user's notes"
    record = read_record(record_path(tmp_path, UNIT))
    assert record is not None and set(record.outputs) == {UNIT}


def _planted_record(folder: Path, outputs: dict[str, str]) -> None:
    """A record in our format written by someone who can write the output folder."""
    data = {"stamp_provenance": 1, "key": "planted", "stage": "unit", "inputs": {}, "settings": {},
            "code": "x", "weights": None, "subject": None, "outputs": outputs}  # fmt: skip
    record_path(folder, UNIT).write_text(json.dumps(data))


def test_a_planted_record_cannot_remove_files_outside_the_folder(tmp_path: Path) -> None:
    """L1/H2: names in a record are only removed when they stay inside the unit's folder."""
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    _planted_record(out, {"../victim.txt": "0", str(victim): "0", "sub/../../victim.txt": "0"})
    _publish(out, {UNIT: b"ours"}, _prov())
    assert victim.read_bytes() == b"precious"


def test_a_planted_record_cannot_remove_files_through_a_symlinked_subfolder(tmp_path: Path) -> None:
    """L1/H2: a record naming ``link/victim`` where ``link`` is a symlink must not delete the target."""
    out = tmp_path / "out"
    out.mkdir()
    victim_dir = tmp_path / "elsewhere"
    victim_dir.mkdir()
    victim = victim_dir / "victim.txt"
    victim.write_bytes(b"precious")
    (out / "link").symlink_to(victim_dir)
    _planted_record(out, {"link/victim.txt": "0"})
    _publish(out, {UNIT: b"ours"}, _prov())
    assert victim.read_bytes() == b"precious"


def test_crash_between_record_and_rename_is_stale_not_foreign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L3: the record is written before the files are renamed in; a crash between leaves ours, STALE."""
    _publish(tmp_path, {UNIT: b"v1"}, _prov())
    real_replace, calls = os.replace, []

    def crash_after_record(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == UNIT:
            raise OSError("killed while renaming")
        real_replace(src, dst)

    staged = _staged(tmp_path, {UNIT: b"v2"})
    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash_after_record)
        with pytest.raises(OSError, match="killed"):
            publish_files(tmp_path, UNIT, staged, _prov(x=2))
    assert calls == [record_path(tmp_path, UNIT).name, UNIT], "the record goes first"
    staged[UNIT].unlink()
    assert (tmp_path / UNIT).read_bytes() == b"v1"
    for prov in (_prov(), _prov(x=2)):  # neither the old nor the new computation may reuse it
        check = check_files(tmp_path, UNIT, [UNIT], prov)
        assert check.verdict is Verdict.STALE, check
    assert "changed since it was written" in check_files(tmp_path, UNIT, [UNIT], _prov(x=2)).reason
    _publish(tmp_path, {UNIT: b"v2"}, _prov(x=2))  # the next run replaces it (it is ours)
    assert check_files(tmp_path, UNIT, [UNIT], _prov(x=2)).reusable


def test_provenance_key_is_stable_across_dict_ordering() -> None:
    """M5/H5: equal provenances give equal keys whatever the dict order; any change gives another key."""
    a = Provenance("s", {"slide": "1", "h5": "2"}, {"b": {"y": 1, "x": [1, 2]}, "a": Path("/p")}, "c", "w")
    b = Provenance("s", {"h5": "2", "slide": "1"}, {"a": "/p", "b": {"x": [1, 2], "y": 1}}, "c", "w")
    assert a.key == b.key and len(a.key) == 64
    assert (
        a.key
        != Provenance("s", {"slide": "1", "h5": "2"}, {"b": {"y": 1, "x": [2, 1]}, "a": "/p"}, "c", "w").key
    )
    assert a.key != Provenance("s", {"slide": "1", "h5": "2"}, dict(b.settings), "c", None).key


# --------------------------------------------------------------------------- folder units


def _staging(final: Path, files: dict[str, bytes]) -> Path:
    with staging_dir(final) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return tmp


def test_foreign_folder_is_left_untouched(tmp_path: Path) -> None:
    """H2: a folder without our record (e.g. a crossval folder named like a slide) is never replaced."""
    final = tmp_path / "crossval"
    (final / "split-0").mkdir(parents=True)
    (final / "model.ckpt").write_bytes(b"weights")
    (final / "split-0" / "patient-preds.csv").write_bytes(b"p,y\n")
    before = _tree(final)
    check = check_folder(final, _prov())
    assert check.verdict is Verdict.FOREIGN and str(final) in check.reason
    staging = _staging(final, {"a.png": b"png"})
    with pytest.raises(ForeignOutput, match="not written by stamp") as e:
        publish_folder(staging, final, _prov())
    assert str(final) in str(e.value)
    assert _tree(final) == before and not (final / FOLDER_RECORD).exists()
    assert staging.is_dir(), "the staging folder is left for the caller"


def test_our_folder_is_replaced_and_an_empty_one_is_absent(tmp_path: Path) -> None:
    """H2/L3: a folder we wrote is replaced whole (no old files, no temp or old folders left)."""
    final = tmp_path / "slide"
    final.mkdir()
    assert check_folder(final, _prov()).verdict is Verdict.ABSENT  # an empty folder holds nothing
    publish_folder(_staging(final, {"a.png": b"1", "raw/b.npz": b"2"}), final, _prov())
    assert check_folder(final, _prov()).reusable
    assert _tree(final).keys() == {"a.png", "raw/b.npz", FOLDER_RECORD}
    check = check_folder(final, _prov(x=5))
    assert check.verdict is Verdict.STALE and "settings.x" in check.reason
    publish_folder(_staging(final, {"c.png": b"3"}), final, _prov(x=5))
    assert _tree(final).keys() == {"c.png", FOLDER_RECORD} and (final / "c.png").read_bytes() == b"3"
    assert check_folder(final, _prov(x=5)).reusable and not leftover_temps(tmp_path)
    (final / "c.png").write_bytes(b"edited")
    assert check_folder(final, _prov(x=5)).verdict is Verdict.STALE


def test_folder_of_another_subject_or_a_symlink_is_foreign(tmp_path: Path) -> None:
    """H2/M5: our folder for slide A is not replaced by slide B; a symlinked folder is not followed."""
    final = tmp_path / "s1"
    a, b = Subject("/wsi/A/s1.svs", "sha-A"), Subject("/wsi/B/s1.svs", "sha-B")
    publish_folder(_staging(final, {"x.png": b"A"}), final, _prov(), subject=a)
    check = check_folder(final, _prov(), subject=b)
    assert check.verdict is Verdict.FOREIGN and "/wsi/A/s1.svs" in check.reason
    with pytest.raises(ForeignOutput, match="holds the output of /wsi/A/s1.svs"):
        publish_folder(_staging(final, {"x.png": b"B"}), final, _prov(), subject=b)
    assert (final / "x.png").read_bytes() == b"A"
    link = tmp_path / "link"
    link.symlink_to(final)
    assert check_folder(link, _prov(), subject=a).verdict is Verdict.FOREIGN


# --------------------------------------------------------------------------- fileio


def test_atomic_path_uses_a_tagged_temp_and_leaves_none_on_error(tmp_path: Path) -> None:
    """L3: temp names are sweepable (``.<name>.stamp-tmp-<host>-<pid>-…``); a failed write leaves none."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    seen = []
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        seen.append(tmp.name)
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert seen[0].startswith(f".out.txt.stamp-tmp-{fileio.PROCESS_SPACE}-{os.getpid()}-")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_temp_files_are_created_exclusively_never_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L1: symlinks planted at old-style predictable temp names, or at the very name chosen, are not followed."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    out = tmp_path / "shared"
    out.mkdir()
    planted = [".summary.md.tmp", f".summary.md.{os.getpid()}.tmp", ".summary.md.tmp-1"]
    for name in planted:
        (out / name).symlink_to(victim)
    # the first random name mkstemp picks is planted too: O_EXCL makes it pick another one
    names = iter(["planted", "free"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    chosen = out / f"{fileio.temp_prefix('summary.md')}planted"
    chosen.symlink_to(victim)
    planted.append(chosen.name)
    atomic_write_text(out / "summary.md", "# summary\n")
    assert victim.read_bytes() == b"do not touch"
    assert (out / "summary.md").read_text() == "# summary\n" and not (out / "summary.md").is_symlink()
    assert all((out / n).is_symlink() for n in planted), "planted links are neither followed nor replaced"
    assert next(names, None) is None, "mkstemp had to skip the planted name"


def test_file_log_refuses_a_symlinked_logfile(tmp_path: Path) -> None:
    """L1: ``logfile.log`` planted as a symlink is not appended to (OSError), the victim is unchanged."""
    from stamp.logs import LOGFILE_NAME, add_file_log, logger, remove_file_logs

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    out = tmp_path / "shared"
    out.mkdir()
    (out / LOGFILE_NAME).symlink_to(victim)
    try:
        with pytest.raises(OSError):
            add_file_log(out)
        logger.warning("a line that must not reach the victim")
    finally:
        remove_file_logs()
    assert victim.read_bytes() == b"do not touch"
    fine = tmp_path / "fine"
    try:
        path = add_file_log(fine)
        logger.warning("a line in the log")
    finally:
        remove_file_logs()
    assert path == fine.resolve() / LOGFILE_NAME and "a line in the log" in path.read_text()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _unshare_pid_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_pid_works(), reason="needs unshare --pid (a PID namespace)")
def test_sweep_temps_keeps_a_young_temp_of_a_writer_in_another_pid_namespace(tmp_path: Path) -> None:
    """L2/L3: a container sharing our host name has its own PIDs; its live temp is not judged by ours."""
    writer = (
        "import os, sys, time; from stamp import fileio; "
        "p = os.path.join(sys.argv[1], fileio.temp_prefix('s1.h5', fileio.TEMP_TAG) + 'x'); "
        "open(p, 'w').write('partial'); print(p, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", writer, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        temp = Path(proc.stdout.readline().strip())
        assert (
            temp.exists() and f"-{fileio.PROCESS_SPACE}-" not in temp.name
        )  # another namespace, another tag
        assert sweep_temps(tmp_path, lifetime_s=3600) == []
        assert temp.read_text() == "partial"
    finally:
        proc.kill()
        proc.wait()


def test_sweep_temps_removes_only_temps_whose_writer_is_gone_or_that_are_old(tmp_path: Path) -> None:
    """L3: what a killed run left is swept at stage start; live writers' temps and other files stay."""
    host = fileio.PROCESS_SPACE
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sub = tmp_path / "site"
        sub.mkdir()
        gone = [
            tmp_path / f".s1.h5.stamp-tmp-{host}-{dead}-xyz",
            sub / f".s2.jpg.stamp-tmp-{host}-{dead}-abc",
            tmp_path / f".slide.stamp-old-{host}-{dead}-q1",  # a folder renamed aside
        ]
        kept = [
            tmp_path / f".s3.h5.stamp-tmp-{host}-{live.pid}-xyz",  # its writer is running
            tmp_path / f".s4.h5.stamp-tmp-{host}-{os.getpid()}-xyz",  # ours
            tmp_path / f".s5.h5.stamp-tmp-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-x",  # other host
            tmp_path / ".s6.h5.tmp",  # old-style name: not ours to judge
            tmp_path / f"s7.h5.stamp-tmp-{host}-{dead}-x",  # not hidden
            tmp_path / "results.csv",
        ]
        old = tmp_path / f".s8.h5.stamp-tmp-{host}-{live.pid}-old"
        for p in [*gone[:2], *kept, old]:
            p.write_bytes(b"x")
        gone[2].mkdir()
        (gone[2] / "plots").mkdir()
        (gone[2] / "plots" / "a.png").write_bytes(b"png")
        long_ago = time.time() - 7200
        os.utime(old, (long_ago, long_ago))
        removed = sweep_temps(tmp_path, lifetime_s=3600)
        assert sorted(removed) == sorted([*gone, old])
        assert not any(p.exists() for p in [*gone, old])
        assert all(p.read_bytes() == b"x" for p in kept)
    finally:
        live.kill()
        live.wait()


def test_atomic_writes_and_folder_publishing_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L3: the temp file is fsynced before the rename and the folder after it (power loss)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    target = tmp_path / "out.txt"
    atomic_write_text(target, "data")
    assert any(Path(p).name.startswith(".out.txt.stamp-tmp-") for p in synced), synced
    assert str(tmp_path) in synced, "the folder must be fsynced after the rename"
    synced.clear()
    final = tmp_path / "slide"
    publish_dir(_staging(final, {"plots/a.png": b"png"}), final)
    assert any(p.endswith("/plots/a.png") for p in synced) and str(tmp_path) in synced, synced


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_publish_dir_replaces_a_folder_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """L3: old content gone, new content present, nothing left beside it (with or without renameat2)."""
    if not exchange:
        monkeypatch.setattr(fileio, "_renameat2_exchange", lambda a, b: False)
    final = tmp_path / "slide"
    (final / "raw").mkdir(parents=True)
    (final / "raw" / "old.png").write_bytes(b"old")
    (final / "old.txt").write_bytes(b"old")
    publish_dir(_staging(final, {"new.txt": b"new", "plots/p.png": b"png"}), final)
    assert _tree(final) == {"new.txt": b"new", "plots/p.png": b"png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide"], "no .stamp-old-/.stamp-tmp- left"
