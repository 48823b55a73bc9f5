"""Benchmark: write one synthetic 20,000 x 20,000 px Aperio slide on one core.

Not a test. Pins the process to one CPU (``os.sched_setaffinity``), one thread
everywhere, and prints wall time, peak RSS and a ratio table against the floor:
JPEG-encoding the same number of tiles alone (the written level-0 tiles, read
back and re-encoded, cycling through a sample). Budget: <= 20 s, < 1 GiB.

    .venv/bin/python bench/bench_synthetic.py [--size 20000] [--mpp 0.25] [--out DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import imagecodecs  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _encode_floor(path: Path, quality: int, sample: int = 256) -> tuple[float, int]:
    """Seconds to JPEG-encode as many 256² tiles as all levels hold, from a sample of real tiles."""
    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if p.is_tiled]
        n_tiles = sum(len(p.dataoffsets) for p in pages)
        page0 = pages[0]
        fh = tf.filehandle
        idx = np.linspace(0, len(page0.dataoffsets) - 1, sample).astype(int)
        tiles = []
        for i in idx:
            fh.seek(page0.dataoffsets[i])
            tiles.append(
                imagecodecs.jpeg8_decode(
                    fh.read(page0.databytecounts[i]), colorspace="YCBCR", outcolorspace="RGB"
                )
            )
    t0 = time.perf_counter()
    for k in range(n_tiles):
        imagecodecs.jpeg8_encode(
            tiles[k % sample], level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )
    return time.perf_counter() - t0, n_tiles


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--planted", type=float, default=0.25)
    ap.add_argument(
        "--out", type=Path, default=None, help="folder to keep the slide in (default: temp, deleted)"
    )
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    rss_start = _peak_rss_mib()

    from stamp.synthetic import SlideSpec, write_slide

    spec = SlideSpec(width=args.size, height=args.size, mpp=args.mpp, planted_fraction=args.planted, seed=1)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = Path(tmp) / "bench.svs"
        stats: dict[str, float] = {}
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        truth = write_slide(path, spec, stats=stats)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        peak = _peak_rss_mib()
        size_mb = path.stat().st_size / 1e6
        floor, n_tiles = _encode_floor(path, spec.jpeg_quality)

    print(
        f"synthetic slide {args.size}x{args.size} @ {args.mpp} µm/px, 1 core, {n_tiles} JPEG tiles in all levels"
    )
    print(
        f"tissue fraction {truth.tissue_fraction:.3f}, planted fraction {truth.planted_fraction:.3f}, file {size_mb:.0f} MB"
    )
    print(f"peak RSS {peak:.0f} MiB (process before the write: {rss_start:.0f} MiB)   CPU time {cpu:.2f} s")
    print()
    print(f"{'phase':<34}{'seconds':>9}{'x floor':>9}")
    rows = [
        ("total write_slide (wall)", wall),
        ("  masks", stats["masks"]),
        ("  texture atlases (cold cache)", stats["atlases"]),
        ("  truth files (GeoJSON, PNG)", stats["truth_files"]),
        ("  level 0 streamed", stats["level0_total"]),
        ("    paint tiles", stats["paint"]),
        ("    JPEG encode tiles", stats["encode"]),
        ("    downsample to level 1", stats["downsample"]),
        ("  lower levels + thumbnail", stats["lower_levels"]),
        ("  label + macro", stats["associated"]),
        ("floor: JPEG-encode all tiles alone", floor),
    ]
    for name, sec in rows:
        print(f"{name:<34}{sec:>9.2f}{sec / floor:>9.1f}")
    ok = wall <= 20.0 and peak < 1024
    print()
    print(f"budget (<= 20 s, < 1024 MiB): {'OK' if ok else 'EXCEEDED'}")


if __name__ == "__main__":
    main()
