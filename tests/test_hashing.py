"""Content digests and cache keys without Prefect: memo, rename, parameter and byte changes."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

from stamp.hashing import DigestIndex, code_hash, file_sha256, stage_cache_key


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
