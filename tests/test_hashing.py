"""Content digests and cache keys without Prefect: memo, rename, parameter and byte changes."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import stat
import time
from pathlib import Path

import pytest

from stamp.hashing import DigestIndex, code_hash, file_sha256, stage_cache_key

FOREIGN_UID = 12345


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    p = _write(tmp_path / "a.svs", data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_index_memoises_and_notices_changes(tmp_path: Path) -> None:
    index = DigestIndex(tmp_path / "idx")
    p = _write(tmp_path / "s.svs", b"slide-bytes" * 1000)
    first = index.lookup(p)
    assert first.computed and first.sha256 == file_sha256(p)
    again = index.lookup(p)
    assert not again.computed and again.sha256 == first.sha256
    # A new index object (another process, later) reads the same entry from disk.
    assert not DigestIndex(tmp_path / "idx").lookup(p).computed
    # Changing the file (size and mtime) invalidates the memo.
    _write(p, b"slide-bytes" * 1000 + b"!")
    changed = index.lookup(p)
    assert changed.computed and changed.sha256 != first.sha256


def test_renamed_file_same_digest(tmp_path: Path) -> None:
    index = DigestIndex(tmp_path / "idx")
    p = _write(tmp_path / "s.svs", b"x" * 10_000)
    before = index.sha256(p)
    moved = tmp_path / "sub" / "renamed.svs"
    moved.parent.mkdir()
    p.rename(moved)
    assert index.sha256(moved) == before


def _entries(index_dir: Path) -> set[Path]:
    return {p for p in index_dir.rglob("*.json")}


def _memoise(index: DigestIndex, path: Path) -> Path:
    """Look ``path`` up (computing it) and return the index entry file that lookup wrote."""
    before = _entries(index.index_dir) if index.index_dir.exists() else set()
    assert index.lookup(path).computed
    (entry,) = _entries(index.index_dir) - before
    return entry


def test_rewrite_keeping_size_and_mtime_is_rehashed(tmp_path: Path) -> None:
    """M7: `cp -p`, `rsync -t` or a restore keep size and mtime; the memo must still see new bytes."""
    index = DigestIndex(tmp_path / "idx")
    p = _write(tmp_path / "s.svs", b"A" * 100_000)
    old = index.lookup(p)
    assert old.computed and not index.lookup(p).computed
    st = p.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so the rewrite gets a new ctime
    _write(p, b"B" * 100_000)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = p.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert now.st_ctime_ns != st.st_ctime_ns, "test precondition: the rewrite must move ctime"
    new = index.lookup(p)
    assert new.computed and new.sha256 == hashlib.sha256(b"B" * 100_000).hexdigest() != old.sha256
    # Replacing the file by another inode with the same size and mtime (cp -p onto a renamed name).
    q = _write(tmp_path / "q.svs", b"C" * 100_000)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
    q.replace(p)
    assert index.sha256(p) == hashlib.sha256(b"C" * 100_000).hexdigest()


def test_planted_entries_are_not_served(tmp_path: Path) -> None:
    """M7: an entry claiming another file's digest for this file is ignored and recomputed."""
    index = DigestIndex(tmp_path / "idx")
    a = _write(tmp_path / "a.svs", b"a" * 4096)
    b = _write(tmp_path / "b.svs", b"b" * 4096)
    digest_a, digest_b = file_sha256(a), file_sha256(b)
    entry_a, entry_b = _memoise(index, a), _memoise(index, b)
    assert entry_a != entry_b

    # 1. A's entry copied verbatim to B's entry name.
    entry_b.write_bytes(entry_a.read_bytes())
    got = index.lookup(b)
    assert got.computed and got.sha256 == digest_b

    # 2. B's own identity with A's digest, but the ctime of an earlier version of the file.
    planted = json.loads(entry_b.read_text())
    planted["sha256"] = digest_a
    if "ctime_ns" in planted:
        planted["ctime_ns"] -= 1
    entry_b.write_text(json.dumps(planted))
    got = index.lookup(b)
    assert got.computed and got.sha256 == digest_b
    assert not index.lookup(b).computed  # the recomputed entry replaced the planted one

    # 3. A perfect entry for B's current identity with A's digest, written by someone else.
    planted = json.loads(entry_b.read_text())
    planted["sha256"] = digest_a
    entry_b.write_text(json.dumps(planted))
    os.chown(entry_b, FOREIGN_UID, FOREIGN_UID)
    got = index.lookup(b)
    assert got.computed and got.sha256 == digest_b


def test_index_is_private(tmp_path: Path) -> None:
    """M7: folders the index creates are 0700 and entries 0600, whatever the umask."""
    cache = tmp_path / "cache"
    index = DigestIndex(cache / "digests")
    p = _write(tmp_path / "s.svs", b"s" * 1000)
    old_umask = os.umask(0)
    try:
        entry = _memoise(index, p)
    finally:
        os.umask(old_umask)
    for d in (cache, cache / "digests", entry.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert not [f for f in entry.parent.iterdir() if f.name.endswith(".tmp")]


def _unsafe_group_writable(tmp_path: Path) -> Path:
    d = tmp_path / "idx"
    d.mkdir()
    d.chmod(0o777)
    return d


def _unsafe_foreign_owner(tmp_path: Path) -> Path:
    d = tmp_path / "idx"
    d.mkdir(mode=0o700)
    os.chown(d, FOREIGN_UID, FOREIGN_UID)
    return d


def _unsafe_parent(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    return cache / "digests"


def _unsafe_symlink(tmp_path: Path) -> Path:
    real = tmp_path / "real-idx"
    real.mkdir(mode=0o700)
    (tmp_path / "idx").symlink_to(real)
    return tmp_path / "idx"


@pytest.mark.parametrize(
    "make_dir", [_unsafe_group_writable, _unsafe_foreign_owner, _unsafe_parent, _unsafe_symlink]
)
def test_unsafe_index_dir_is_not_used(tmp_path: Path, stamp_log: pytest.LogCaptureFixture, make_dir) -> None:  # noqa: ANN001
    """M7: an index others could write is never read or written; every lookup hashes in full."""
    index_dir = make_dir(tmp_path)
    modes = {d: d.lstat().st_mode for d in (index_dir, index_dir.parent) if os.path.lexists(d)}
    p = _write(tmp_path / "s.svs", b"s" * 10_000)
    index = DigestIndex(index_dir)
    for _ in range(3):
        got = index.lookup(p)
        assert got.computed and got.sha256 == file_sha256(p)
    assert DigestIndex(index_dir).lookup(p).computed
    warnings = [r for r in stamp_log.records if r.levelno == logging.WARNING and r.name == "stamp"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "STAMP_CACHE_DIR" in warnings[0].getMessage()
    assert not list(index_dir.parent.rglob("*.json"))
    assert {d: d.lstat().st_mode for d in modes} == modes  # never chmod a folder it did not create


def _key(digest: str, **params: object) -> str:
    return stage_cache_key(
        task_name="preprocess-slide", content_sha256=digest, params=params, code_version="c1"
    )


def test_stage_cache_key_semantics(tmp_path: Path) -> None:
    index = DigestIndex(tmp_path / "idx")
    p = _write(tmp_path / "s.svs", b"y" * 50_000)
    base = _key(index.sha256(p), tile_size_um=256.0, extractor="ctranspath")
    # moved slide → same key
    moved = p.rename(tmp_path / "other-name.svs")
    assert _key(index.sha256(moved), tile_size_um=256.0, extractor="ctranspath") == base
    # parameter order does not matter, a changed parameter does
    assert _key(index.sha256(moved), extractor="ctranspath", tile_size_um=256.0) == base
    assert _key(index.sha256(moved), tile_size_um=512.0, extractor="ctranspath") != base
    # one byte changed → new key
    data = bytearray(moved.read_bytes())
    data[1234] ^= 0xFF
    moved.write_bytes(bytes(data))
    assert _key(index.sha256(moved), tile_size_um=256.0, extractor="ctranspath") != base
    # task name, code version and weights are part of the key
    d = "0" * 64
    k = stage_cache_key(task_name="a", content_sha256=d, params={}, code_version="1")
    assert k != stage_cache_key(task_name="b", content_sha256=d, params={}, code_version="1")
    assert k != stage_cache_key(task_name="a", content_sha256=d, params={}, code_version="2")
    assert k != stage_cache_key(
        task_name="a", content_sha256=d, params={}, code_version="1", weights_sha256="w"
    )
    # paths in parameters are canonical strings
    assert stage_cache_key(task_name="a", content_sha256=d, params={"p": Path("/x")}, code_version="1") == (
        stage_cache_key(task_name="a", content_sha256=d, params={"p": "/x"}, code_version="1")
    )


def _lookup_in_child(index_dir: str, path: str, barrier, queue) -> None:  # noqa: ANN001
    barrier.wait()
    d = DigestIndex(index_dir).lookup(path)
    queue.put((d.sha256, d.computed))


def test_two_processes_hash_once(tmp_path: Path) -> None:
    p = _write(tmp_path / "big.svs", os.urandom(64 * 1024 * 1024))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_lookup_in_child, args=(str(tmp_path / "idx"), str(p), barrier, queue))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    digests = {r[0] for r in results}
    assert digests == {file_sha256(p)}
    assert sorted(r[1] for r in results) == [False, True], "exactly one process must compute the digest"


def test_code_hash_changes_with_source(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.py", b"x = 1\n")
    b = _write(tmp_path / "b.py", b"y = 2\n")
    h = code_hash([a, b])
    assert h == code_hash([b, a])
    _write(a, b"x = 3\n")
    assert code_hash([a, b]) != h


def test_a_file_replaced_whole_while_hashed_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run renaming a finished output into place mid-read: the new bytes' digest, not an error."""
    import hashlib as _hashlib

    from stamp import hashing

    target = tmp_path / "slide-1.jpg"
    target.write_bytes(b"old")
    real = hashing.file_sha256
    calls = {"n": 0}

    def replaced_during_first_read(p):  # noqa: ANN001, ANN202
        calls["n"] += 1
        digest = real(p)
        if calls["n"] == 1:
            (tmp_path / "new").write_bytes(b"new bytes")
            os.replace(tmp_path / "new", target)
        return digest

    monkeypatch.setattr(hashing, "file_sha256", replaced_during_first_read)
    index = DigestIndex(tmp_path / "index")
    assert index.sha256(target) == _hashlib.sha256(b"new bytes").hexdigest()
    assert calls["n"] == 2
