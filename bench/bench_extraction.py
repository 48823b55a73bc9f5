"""Benchmark: feature extraction tiles/s against a bare ``model(x)`` loop (same model, batch, precision).

Not a test. In one run it measures:

* ``bare``: ``model(x)`` on a ready, normalised float batch already on the device, under
  ``inference_mode`` (and autocast to the precision on CUDA) — the floor of what the model costs;
* ``extract``: our pipeline — a producer thread feeds uint8 tiles (N, H, W, 3) through a bounded
  queue (``--loader memory``: slices of a pre-made pool, the cost of decoding excluded;
  ``--loader jpeg``: JPEG-decoded by ``--loader-threads`` threads), and the consumer runs
  ``Encoder.forward_uint8`` (uint8 to the device, resize/normalise there, model, float16 features)
  and copies the features back to the host;

alternating the two ``--repeat`` times (best of each: this kind of shared machine drifts), and
prints tiles/s of both, their ratio, the share of the consumer's time spent waiting for the
loader, and — with a FLOP count — how far ``bare`` is from the device's FLOP limit.

    .venv/bin/python bench/bench_extraction.py                       # CPU, resnet18, batch 32
    .venv/bin/python bench/bench_extraction.py --model demo --batch 256 --n-tiles 2048
    python bench/bench_extraction.py --device cuda --model vit_large_patch16_224 --precision bf16 \\
        --batch auto --n-tiles 20000 --json out.json                     # UNI's architecture, random weights

``--model`` is a registry name whose architecture needs no weights (``demo``, ``empty``) or any
timm architecture (built with random weights, ``num_classes=0``). ``--peak-tflops`` is the device's
dense peak for the precision (default on CUDA: 989, an H100/H200 SXM at bf16/fp16).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stamp.encoders import ENCODERS  # noqa: E402
from stamp.encoders.loading import Encoder, load_encoder  # noqa: E402
from stamp.encoders.registry import EncoderSpec, InputSpec  # noqa: E402


def make_encoder(name: str, device: torch.device, precision: str, px: int) -> Encoder:
    if name in ENCODERS:
        enc = load_encoder(name, device=device)
        enc.precision = precision if precision != "auto" else enc.precision
        return enc
    import timm

    with device if device.type == "cuda" else torch.device("cpu"):
        model = timm.create_model(name, pretrained=False, num_classes=0).eval().requires_grad_(False)
    dim = int(model.num_features)
    spec = EncoderSpec(
        name=f"bench:{name}",
        family="bench",
        dim=dim,
        input=InputSpec(px, px),
        n_params=None,
        tile_px=px,
        mpp=None,
        precision="fp32" if precision == "auto" else precision,
        weights=None,
        license="-",
        gated=False,
        timm_arch=name,
    )
    return Encoder(spec, model.to(device), device=device, weights_sha256="0" * 64)


def flops_per_tile(enc: Encoder, px: int) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, px, px, device=enc.device)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            enc.model(x)
        return float(fc.get_total_flops())
    except Exception as e:  # flop counting is best effort
        print(f"(flop count unavailable: {type(e).__name__}: {e})")
        return None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_loop(enc: Encoder, batch: int, px: int, n_batches: int) -> float:
    x = torch.randn(batch, 3, px, px, device=enc.device)
    with torch.inference_mode(), enc.autocast():
        for _ in range(2):
            enc.model(x)
        sync(enc.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            enc.model(x)
        sync(enc.device)
    return batch * n_batches / (time.perf_counter() - t0)


def auto_batch(enc: Encoder, px: int, start: int, cap: int) -> int:
    """Largest power-of-two batch (<= cap) whose forward fits in memory, at 7/8 of it for headroom."""
    if enc.device.type != "cuda":
        return start
    ok, b = None, start
    while b <= cap:
        try:
            x = torch.randn(b, 3, px, px, device=enc.device)
            with torch.inference_mode(), enc.autocast():
                enc.model(x)
            sync(enc.device)
            ok = b
            del x
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if ok is None:
        raise SystemExit(f"even batch {start} does not fit")
    return ok if ok == cap else max(start, ok * 7 // 8)


def producer(
    tiles: np.ndarray, batch: int, n_batches: int, q: queue.Queue, loader: str, threads: int, pin: bool
) -> None:
    pool = ThreadPoolExecutor(threads) if loader == "jpeg" else None
    if loader == "jpeg":
        import cv2

        blobs = [cv2.imencode(".jpg", t, [cv2.IMWRITE_JPEG_QUALITY, 80])[1] for t in tiles]
    for i in range(n_batches):
        idx = [(i * batch + j) % len(tiles) for j in range(batch)]
        if pool is not None:
            import cv2

            arr = np.stack(list(pool.map(lambda k: cv2.imdecode(blobs[k], cv2.IMREAD_COLOR), idx)))
        else:
            arr = tiles[idx]
        t = torch.from_numpy(arr)
        q.put(t.pin_memory() if pin else t)
    q.put(None)
    if pool is not None:
        pool.shutdown()


def extract_loop(
    enc: Encoder, tiles: np.ndarray, batch: int, n_batches: int, loader: str, threads: int, qsize: int
) -> tuple[float, float]:
    pin = enc.device.type == "cuda"
    # warm-up (allocations, cudnn autotune) outside the timed region
    enc.forward_uint8(torch.from_numpy(tiles[:batch])).cpu()
    q: queue.Queue = queue.Queue(maxsize=qsize)
    th = threading.Thread(
        target=producer, args=(tiles, batch, n_batches, q, loader, threads, pin), daemon=True
    )
    t0 = time.perf_counter()
    th.start()
    waited, done = 0.0, 0
    while True:
        w0 = time.perf_counter()
        b = q.get()
        waited += time.perf_counter() - w0
        if b is None:
            break
        enc.forward_uint8(b).cpu()
        done += b.shape[0]
    total = time.perf_counter() - t0
    th.join()
    return done / total, waited / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18", help="registry name (demo, empty) or timm architecture")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--batch", default="32", help="batch size or 'auto' (largest that fits, CUDA)")
    p.add_argument("--n-tiles", type=int, default=0, help="tiles per measurement (default: 8 batches)")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--loader", default="memory", choices=["memory", "jpeg"])
    p.add_argument("--loader-threads", type=int, default=2)
    p.add_argument("--queue", type=int, default=4, help="batches buffered between loader and model")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: leave)")
    p.add_argument("--repeat", type=int, default=3, help="alternate bare/extract this often; best of each")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)

    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    px = a.tile_px
    enc = make_encoder(a.model, dev, a.precision, px)
    batch = auto_batch(enc, px, 64, 4096) if a.batch == "auto" else int(a.batch)
    n_batches = max(2, (a.n_tiles or 8 * batch) // batch)
    rng = np.random.default_rng(0)
    pool_n = min(n_batches * batch, max(2 * batch, 256))
    tiles = rng.integers(0, 256, (pool_n, px, px, 3), dtype=np.uint8)

    fl = flops_per_tile(enc, px) if enc.dim else None
    bares, exts = [], []
    for _ in range(max(1, a.repeat)):  # alternate, so drifting machine load hits both alike
        bares.append(bare_loop(enc, batch, px, n_batches))
        exts.append(extract_loop(enc, tiles, batch, n_batches, a.loader, a.loader_threads, a.queue))
    bare = max(bares)
    ext, wait = max(exts)
    peak = a.peak_tflops if a.peak_tflops is not None else (989.0 if dev.type == "cuda" else None)
    limit = peak * 1e12 / fl if (peak and fl) else None

    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    )
    res = {
        "model": a.model,
        "device": name,
        "precision": enc.precision if dev.type == "cuda" else "fp32 (no autocast on CPU)",
        "batch": batch,
        "tiles": n_batches * batch,
        "loader": a.loader,
        "bare_tiles_s": round(bare, 1),
        "extract_tiles_s": round(ext, 1),
        "repeats_bare": [round(v, 1) for v in bares],
        "repeats_extract": [round(v, 1) for v, _ in exts],
        "ratio_extract_vs_bare": round(ext / bare, 3),
        "loader_wait_share": round(wait, 3),
        "gflops_per_tile": round(fl / 1e9, 2) if fl else None,
        "flop_limit_tiles_s": round(limit, 0) if limit else None,
        "bare_vs_flop_limit": round(bare / limit, 3) if limit else None,
    }
    print(
        f"\nextraction benchmark: {a.model} on {name}, batch {batch}, {res['tiles']} tiles, {px} px, loader {a.loader}"
    )
    rows = [("bare model(x)", bare, 1.0), ("extraction (ours)", ext, ext / bare)]
    print(f"{'':20s} {'tiles/s':>10s} {'ratio':>7s}")
    for label, v, r in rows:
        print(f"{label:20s} {v:10.1f} {r:7.3f}")
    print(
        f"loader-wait share of extraction time: {wait:.1%}   (best of {len(bares)}: bare {res['repeats_bare']}, "
        f"extract {res['repeats_extract']})"
    )
    if fl:
        print(
            f"model: {fl / 1e9:.2f} GFLOP/tile"
            + (
                f"; FLOP limit {limit:,.0f} tiles/s at {peak:g} TFLOP/s, bare reaches {bare / limit:.1%}"
                if limit
                else ""
            )
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
