"""``python -m stamp.encoders``: list encoders, write the weights lock, fetch or pin weights.

python -m stamp.encoders                       # the registry table
python -m stamp.encoders lock -o containers/weights.lock.json
python -m stamp.encoders fetch uni --weights-dir /weights          # prints the command
python -m stamp.encoders fetch uni --weights-dir /weights --run    # downloads (network!)
python -m stamp.encoders pin uni conch --weights-dir /weights -o weights.lock.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stamp.encoders.registry import ENCODERS, encoder_table, get_spec
from stamp.encoders.weights import (
    default_lock,
    fetch_argv,
    fetch_command,
    load_lock,
    lock_to_json,
    pin,
    write_lock,
)


def _fetch(name: str, weights_dir: str, run: bool) -> int:
    spec = get_spec(name)
    entry = load_lock().get(name)
    print(fetch_command(spec, weights_dir, entry=entry))
    argv = fetch_argv(spec, weights_dir, entry=entry)
    if not run or argv is None:
        return 0
    dest = Path(weights_dir) / name
    if entry is not None and entry.hf_repo:
        from huggingface_hub import hf_hub_download

        for fn in entry.files:
            hf_hub_download(entry.hf_repo, fn, revision=entry.revision, local_dir=str(dest))
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, check=False).returncode  # an argv list: lock values never reach a shell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stamp.encoders", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    ls = sub.add_parser("list", help="print the registry table (default)")
    ls.add_argument("--json", action="store_true")
    lk = sub.add_parser("lock", help="write the registry's weights lock")
    lk.add_argument("-o", "--output", default="-")
    fe = sub.add_parser("fetch", help="print (or --run) the command that downloads an encoder's weights")
    fe.add_argument("names", nargs="+")
    fe.add_argument("--weights-dir", required=True)
    fe.add_argument("--run", action="store_true", help="download now (needs network and, if gated, a login)")
    pn = sub.add_parser("pin", help="digest local weight files and write a lock that pins them")
    pn.add_argument("names", nargs="+")
    pn.add_argument("--weights-dir", required=True)
    pn.add_argument("-o", "--output", default="-")
    a = p.parse_args(argv)

    if a.cmd in (None, "list"):
        if getattr(a, "json", False):
            print(
                json.dumps(
                    {
                        n: {"dim": s.dim, "family": s.family, "license": s.license, "gated": s.gated}
                        for n, s in ENCODERS.items()
                    },
                    indent=2,
                )
            )
        else:
            print(encoder_table())
        return 0
    if a.cmd == "lock":
        if a.output == "-":
            print(json.dumps(lock_to_json(default_lock()), indent=2))
        else:
            write_lock(a.output)
        return 0
    if a.cmd == "fetch":
        try:
            return max(_fetch(n, a.weights_dir, a.run) for n in a.names)
        except ValueError as e:  # a lock value that cannot be passed to a download tool
            print(f"error: {e}", file=sys.stderr)
            return 2
    if a.cmd == "pin":
        lock = load_lock()
        lock.update(pin(a.names, a.weights_dir, lock=lock))
        if a.output == "-":
            print(json.dumps(lock_to_json(lock), indent=2))
        else:
            write_lock(a.output, lock)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
