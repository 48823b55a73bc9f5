"""Bake encoder weights into an image at build time, verified by the project's own code.

Run by the Dockerfiles (``RUN --mount=type=secret,id=hf_token ...``), before ``HF_HUB_OFFLINE=1``:

    python bake_weights.py --lock weights.lock.json --weights-dir /opt/stamp/weights [NAME ...]

For every name: the lock entry must match the encoder registry (same repo, revision, files and
sha256) and be fully pinned (a revision for HF repos, a sha256 for every file); the files are
downloaded into ``<weights-dir>/<name>/`` (HF at the pinned revision with the token read from the
build secret file, or the URL), then located and checked with
``stamp.encoders.weights.resolve_weights`` + ``verify_files(strict=True)``, the same path the
pipeline uses when it loads them. ``<weights-dir>/baked.json`` records what was baked (a lock
with the verified digests). No name: only the empty record is written. The token is never printed
or written anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.request
from pathlib import Path

from stamp.encoders.errors import EncoderError
from stamp.encoders.registry import ENCODERS
from stamp.encoders.weights import LockEntry, load_lock, lock_to_json, resolve_weights, verify_files

DEFAULT_TOKEN_FILE = "/run/secrets/hf_token"


class BakeError(RuntimeError):
    """An encoder cannot be baked (unknown, unpinned, lock/registry mismatch, failed download)."""


def check_bakeable(name: str, entry: LockEntry | None) -> LockEntry:
    """Return ``entry`` if it agrees with the registry and is fully pinned, else raise BakeError."""
    spec = ENCODERS.get(name)
    if spec is None or spec.weights is None:
        raise BakeError(f"encoder {name!r} is not in the registry or needs no weights; see `stamp encoders`")
    if entry is None:
        raise BakeError(f"encoder {name!r} is missing from the weights lock; regenerate it")
    reg = LockEntry.from_source(name, spec.weights)
    if (entry.hf_repo, entry.revision, entry.url, dict(entry.files)) != (
        reg.hf_repo,
        reg.revision,
        reg.url,
        dict(reg.files),
    ):
        raise BakeError(
            f"encoder {name!r}: the weights lock disagrees with the registry "
            "(regenerate it: python -m stamp.encoders lock -o containers/weights.lock.json)"
        )
    if entry.hf_repo and not entry.revision:
        raise BakeError(f"encoder {name!r}: {entry.hf_repo} has no pinned revision in the lock; cannot bake")
    unpinned = [f for f, sha in entry.files.items() if sha is None]
    if unpinned:
        raise BakeError(f"encoder {name!r}: no sha256 in the lock for {', '.join(unpinned)}; cannot bake")
    return entry


def read_token(path: str | None) -> str | None:
    """The HF token from the build-secret file, or None when absent/empty."""
    if not path or not Path(path).is_file():
        return None
    return Path(path).read_text().strip() or None


def download(entry: LockEntry, dest: Path, token: str | None) -> None:
    """Fetch every file of ``entry`` into ``dest`` (no verification here)."""
    dest.mkdir(parents=True, exist_ok=True)
    if entry.hf_repo:
        from huggingface_hub import hf_hub_download

        for fn in entry.files:
            hf_hub_download(entry.hf_repo, fn, revision=entry.revision, local_dir=dest, token=token)
        shutil.rmtree(dest / ".cache", ignore_errors=True)
        return
    url = str(entry.url)
    (first,) = list(entry.files)[:1]
    target = dest / first
    if url.startswith("gdrive:"):
        try:
            import gdown
        except ImportError:
            raise BakeError(f"encoder {entry.name!r} is on Google Drive: install gdown to bake it") from None
        gdown.download(id=url[len("gdrive:") :], output=str(target), quiet=True)
        return
    with urllib.request.urlopen(url, timeout=600) as r, open(target, "wb") as fh:
        shutil.copyfileobj(r, fh, 8 * 1024 * 1024)


def bake(names: list[str], lock_path: str, weights_dir: str, token: str | None) -> dict[str, LockEntry]:
    """Download, verify (strict) and record the weights of ``names``; return the baked entries."""
    locks = load_lock(lock_path)
    root = Path(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    baked: dict[str, LockEntry] = {}
    for name in dict.fromkeys(names):
        entry = check_bakeable(name, locks.get(name))
        dest = root / name
        try:
            download(entry, dest, token)
            spec = ENCODERS[name]
            files = resolve_weights(spec, root, lock=locks)
            digests = verify_files(spec, files, lock=locks, strict=True)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        for p in dest.rglob("*"):
            p.chmod(0o555 if p.is_dir() else 0o444)
        baked[name] = LockEntry(name, digests, entry.hf_repo, entry.revision, entry.url, entry.digest_source)
        print(f"bake_weights: {name}: {len(digests)} file(s) verified", file=sys.stderr)
    (root / "baked.json").write_text(json.dumps(lock_to_json(baked), indent=2) + "\n")
    return baked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="encoders to bake (default: none)")
    p.add_argument("--lock", required=True, help="weights lock JSON (containers/weights.lock.json)")
    p.add_argument("--weights-dir", required=True)
    p.add_argument("--token-file", default=DEFAULT_TOKEN_FILE, help="HF token (a build secret)")
    a = p.parse_args(argv)
    names = [n for item in a.names for n in item.replace(",", " ").split()]
    try:
        bake(names, a.lock, a.weights_dir, read_token(a.token_file))
    except (BakeError, EncoderError) as e:
        print(f"bake_weights: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
