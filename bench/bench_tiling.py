"""Benchmark: tiling + rejection throughput against the floor of bare JPEG decode.

Not a test. On one synthetic Aperio slide (20,000² px at 0.25 µm/px by default, written once with
``stamp.synthetic`` to a temp folder if missing) it measures, in one run, tiles/s of:

* ``ours``: :func:`plan_tiles` + :func:`iter_tile_batches` (pyramid level choice, supertiles,
  brightness + Canny rejection), for 1 and N reader threads;
* ``floor``: bare JPEG decode (tifffile ``page.decode``) of exactly the stored JPEG tiles of the
  level ours reads that cover ours' read windows — the bytes are read beforehand, only decode is
  timed — with the same thread counts;
* ``ours[fast]``: the same with ``reader="fast"`` (OpenSlide identifies the slide, tifffile decodes
  the same pixels);
* ``ours@L0``: our code forced to level 0 (what STAMP reads), same rejection, one run;
* ``stamp-style``: a re-statement of STAMP's loop (OpenSlide level-0 supertiles, PIL resize,
  ``convert("RGB")``, crop, Canny) on the same candidate supertiles, for context, one run.

Ratios are against the floor with the same thread count. Best of ``--repeat`` runs (page cache warm).

    .venv/bin/python bench/bench_tiling.py [--size 20000] [--mpp 0.25] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from stamp.slides import TilingParams, iter_tile_batches, open_slide, plan_tiles
from stamp.slides.reader_tifffile import TiffFileReader
from stamp.slides.tile_reading import edge_fraction
from stamp.slides.tiling import TilePlan, stamp_cell_tiles


def ensure_slide(size: int, mpp: float, out: Path) -> Path:
    path = out / f"bench_{size}_{mpp}.svs"
    if not path.exists():
        from stamp.synthetic import SlideSpec, write_slide

        t0 = time.perf_counter()
        write_slide(path, SlideSpec(width=size, height=size, mpp=mpp, planted_fraction=0.2, seed=7))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return path


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    best, n = math.inf, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return best, n


def run_ours(path: Path, mpp: float, params: TilingParams, reader: str = "auto") -> tuple[int, int]:
    with open_slide(path, reader=reader) as r:
        plan = plan_tiles(r, mpp, params)
        it = iter_tile_batches(r, plan, params)
        n = sum(len(b) for b in it)
        return n, it.stats.pixels_read


def floor_segments(path: Path, plan: TilePlan) -> tuple[list[tuple[bytes, int]], object]:
    """Raw bytes of the stored tiles of the read level that cover the plan's read windows."""
    reader = TiffFileReader(path)
    level = reader._levels[plan.level]
    page = level.page
    step = plan.tile_px0 / plan.level_downsample
    wanted: set[int] = set()
    for r0, r1, c0, c1 in plan.groups:
        x0, x1 = round(c0 * step), min(round(c1 * step), level.width)
        y0, y1 = round(r0 * step), min(round(r1 * step), level.height)
        for ty in range(y0 // level.seg_h, (y1 - 1) // level.seg_h + 1):
            for tx in range(x0 // level.seg_w, (x1 - 1) // level.seg_w + 1):
                wanted.add(ty * level.segs_across + tx)
    fh = reader._tif.filehandle
    segs = []
    for i in sorted(wanted):
        fh.seek(int(page.dataoffsets[i]))
        segs.append((fh.read(int(page.databytecounts[i])), i))
    return segs, (reader, page)


def decode_all(segs: list[tuple[bytes, int]], page, threads: int) -> int:
    kw = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader, "_fullsize": True}

    def one(s: tuple[bytes, int]) -> int:
        arr, _, _ = page.decode(s[0], s[1], **kw)
        return arr.size

    if threads == 1:
        return sum(one(s) for s in segs)
    with ThreadPoolExecutor(threads) as ex:
        return sum(ex.map(one, segs))


def run_stamp_style(path: Path, mpp: float, params: TilingParams, plan: TilePlan, threads: int) -> int:
    """STAMP's loop: level-0 supertiles of n×n tiles (1024-px rule), PIL resize, crop, Canny."""
    import openslide

    n = stamp_cell_tiles(mpp, params.tile_size_um)
    side = math.ceil(params.tile_size_um / mpp)
    st = side * n
    px = params.tile_size_px
    cells = sorted({(r // n, c // n) for r, c in zip(*np.nonzero(plan.candidates), strict=True)})
    slide = openslide.OpenSlide(str(path))

    def one(cell: tuple[int, int]) -> int:
        img = (
            slide.read_region((cell[1] * st, cell[0] * st), 0, (st, st))
            .resize((px * n, px * n))
            .convert("RGB")
        )
        arr = np.asarray(img)
        kept = 0
        for j in range(n):
            for i in range(n):
                tile = arr[j * px : (j + 1) * px, i * px : (i + 1) * px]
                kept += edge_fraction(tile) >= (params.canny_cutoff or 0)
        return kept

    try:
        with ThreadPoolExecutor(threads) as ex:
            return sum(ex.map(one, cells))
    finally:
        slide.close()


def measure_config(
    path: Path, mpp: float, base: TilingParams, thread_counts: list[int], repeat: int
) -> list[tuple]:
    """Rows (method, threads, level, tiles, px read, seconds, ratio to floor) for one configuration."""
    with open_slide(path) as r:
        plan = plan_tiles(r, mpp, base)
    segs, (reader, page) = floor_segments(path, plan)
    seg_px = len(segs) * page.tilewidth * page.tilelength
    n_cell = stamp_cell_tiles(mpp, base.tile_size_um)
    ours: dict[str, tuple[int, int]] = {}

    def tile(p: TilingParams, key: str, reader: str = "auto") -> int:
        ours[key] = run_ours(path, mpp, p, reader)
        return ours[key][0]

    rows = []
    try:
        for threads in thread_counts:
            params = TilingParams(**{**base.__dict__, "max_workers": threads})
            level0 = TilingParams(**{**params.__dict__, "read_level": 0, "supertile_tiles": n_cell})
            t_ours, kept = best_of(repeat, partial(tile, params, "auto"))
            t_tf, kept_tf = best_of(repeat, partial(tile, params, "tf", "fast"))
            t_floor, _ = best_of(repeat, partial(decode_all, segs, page, threads))
            t_l0, kept_l0 = best_of(max(1, repeat // 2), partial(tile, level0, "l0"))
            t_st, kept_st = best_of(
                max(1, repeat // 2), partial(run_stamp_style, path, mpp, base, plan, threads)
            )
            floor_tps = kept / t_floor
            for method, level, n, px, secs in (
                ("floor", plan.level, kept, seg_px, t_floor),
                ("ours", plan.level, kept, ours["auto"][1], t_ours),
                ("ours[fast]", plan.level, kept_tf, ours["tf"][1], t_tf),
                ("ours@L0", 0, kept_l0, ours["l0"][1], t_l0),
                ("stamp-style", 0, kept_st, None, t_st),
            ):
                rows.append((method, threads, level, n, px, secs, (n / secs) / floor_tps))
    finally:
        reader.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "stamp-bench")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = ensure_slide(args.size, args.mpp, args.out)
    mpp = args.mpp
    configs = [
        ("256um/224px (1.14 µm/px)", TilingParams()),
        ("128um/112px (1.14 µm/px)", TilingParams(tile_size_um=128.0, tile_size_px=112)),
        ("112um/224px (0.50 µm/px)", TilingParams(tile_size_um=112.0, tile_size_px=224)),
    ]
    print(f"slide {path.name}: {args.size}² px at {mpp} µm/px, {os.cpu_count()} CPUs; best of {args.repeat}")
    header = f"{'config':26} {'method':14} {'thr':>3} {'level':>5} {'kept':>5} {'Mpx read':>9} {'s':>7} {'tiles/s':>8} {'vs floor':>8}"
    print(header)
    print("-" * len(header))
    for name, base in configs:
        for method, thr, level, n, px, secs, ratio in measure_config(
            path, mpp, base, sorted({1, args.threads}), args.repeat
        ):
            mpx = f"{px / 1e6:9.1f}" if px is not None else f"{'-':>9}"
            print(
                f"{name:26} {method:14} {thr:>3} {level:>5} {n:>5} {mpx} {secs:7.3f} {n / secs:8.0f} {ratio:8.2f}"
            )
        print()
    print(
        "floor = JPEG decode only of the stored tiles covering ours' read windows (bytes pre-read), kept tiles / decode s."
    )
    print("ratio < 1 means slower than the floor; ours@L0 / stamp-style read level 0 as STAMP does.")


if __name__ == "__main__":
    main()
