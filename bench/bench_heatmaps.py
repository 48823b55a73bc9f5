"""Benchmark: heatmap relevance tiles/s against the floor of one bare forward pass over the bag.

Not a test. For a random-weight model (``vit`` at STAMP's default width, or ``abmil``) and a bag
of ``--tiles`` random features it measures, best of ``--repeat``:

* ``floor``: one ``model(bag)`` forward under ``inference_mode`` — what any relevance method
  must at least pay (our relevance needs a forward *and* a backward per class and path point);
* ``relevance ig=1``: STAMP's plain gradient × input (``ig_steps: 1``) + single-tile predictions;
* ``relevance ig=N``: our default integrated-gradients relevance (``--ig-steps``, default 8);

and prints tiles/s and the ratio of each to the floor, plus the extra peak memory (RSS).

    .venv/bin/python bench/bench_heatmaps.py                      # vit, 4,000 tiles, 768-d
    .venv/bin/python bench/bench_heatmaps.py --model abmil --tiles 50000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from stamp.heatmaps.relevance import Head, score_tiles
from stamp.modeling.models.registry import build_model


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit", choices=["vit", "abmil"])
    ap.add_argument("--tiles", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, dim_input=args.dim, n_outputs=2, params={}).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.tiles, args.dim)).astype(np.float32)
    side = int(np.ceil(np.sqrt(args.tiles)))
    coords = (
        np.stack([np.arange(args.tiles) % side, np.arange(args.tiles) // side], 1).astype(np.float32) * 256
    )
    head = Head.from_meta(
        {"task": "classification", "categories": {"y": ["a", "b"]}, "ground_truth_label": "y"}
    )
    bag = torch.from_numpy(feats)[None]
    xy = torch.from_numpy(coords)[None]

    def floor() -> object:
        with torch.inference_mode():
            return model(bag, xy)

    rss0 = _rss_mib()
    rows = [("floor: one forward", _best(floor, args.repeat))]
    for steps in sorted({1, args.ig_steps}):
        secs = _best(lambda s=steps: score_tiles(model, head, feats, coords, steps=s), args.repeat)
        rows.append((f"relevance ig={steps}", secs))
    base = rows[0][1]
    print(f"{args.model}: {args.tiles} tiles x {args.dim}-d, torch threads {torch.get_num_threads()}")
    print(f"{'what':24s} {'seconds':>9s} {'tiles/s':>10s} {'x floor':>8s}")
    for name, secs in rows:
        print(f"{name:24s} {secs:9.3f} {args.tiles / secs:10.0f} {secs / base:8.1f}")
    print(f"peak RSS {_rss_mib():.0f} MiB (+{_rss_mib() - rss0:.0f} MiB during the runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
