"""Render one slide's heatmaps (STAMP's file layout, §2.10) — independent of every other slide.

``<output_dir>/<slide>/`` receives::

    plots/overview-<s>.png                 thumbnail, class map / heatmap, per-class maps, attention
    plots/overlay-<s>-<class>.png          (regression/survival: overlay-<s>.png)
    raw/thumbnail-<s>.png                  the slide at the map scale
    raw/<s>-classmap.png                   single-tile classes (Pastel1)            [classification]
    raw/<s>-<class>=<p>.png                support × relevance (RdBu_r, −1..1)      [classification]
    raw/raw-overlay-<s>-<class>.png        thumbnail + map at ``opacity``           [classification]
    raw/<s>-heatmap.png, raw/raw-overlay-<s>.png                                    [regression/survival]
    raw/<s>-attention.png                  attention (vit, abmil; ours)
    raw/<s>-arrays.npz                     every per-tile array (ours)
    tiles/top_NN-<s>-<class>=<score>.jpg   and bottom_NN-…: predicted class only
                                           (regression/survival: top/bottom by relevance)
    <s>-tiles.geojson                      one polygon per tile with its scores (QuPath; ours)

The folder is built under a temp name and swapped into place with its provenance record
(:mod:`stamp.provenance`: slide, features and checkpoint by content, drawing settings, code), so a
failed slide leaves nothing where finished output is expected, and a folder of that name that we did
not write for this slide is never replaced: that slide fails alone. Any failure is one
:class:`HeatmapError` line naming the slide. The model is loaded once per process and checkpoint
(path + mtime + size + device).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from stamp.config_models import resolve_device
from stamp.features import FeatureFileError, read_features
from stamp.fileio import staging_dir
from stamp.hashing import package_code_hash, shared_index
from stamp.heatmaps import figures, maps
from stamp.heatmaps.figures import Colourbar, Panel
from stamp.heatmaps.jobs import HeatmapError, HeatmapJob
from stamp.heatmaps.loading import cached_model, check_features, check_fit, slide_mpp
from stamp.heatmaps.outputs import TopTile, geojson_text, rank, safe_name, save_arrays, top_tiles, write_tiles
from stamp.heatmaps.relevance import IG_STEPS, Head, TileScores, minmax, score_tiles
from stamp.modeling.checkpoint import CheckpointError
from stamp.provenance import Check, ForeignOutput, Provenance, Subject, check_folder, publish_folder
from stamp.slides import SlideError, open_slide
from stamp.slides.reader_base import SlideReader

__all__ = [
    "SUMMARY_NAME",
    "SlideHeatmaps",
    "check_heatmaps",
    "finished_heatmaps",
    "heatmaps_code_version",
    "render_slide",
]

SUMMARY_NAME = ".summary.json"
"""The slide's :class:`SlideHeatmaps` as JSON, inside its folder (hidden, like the record)."""
MIN_TOP = 5  # top tiles recorded in the result per output even when ``topk`` is smaller


@dataclass
class SlideHeatmaps:
    """What :func:`render_slide` wrote for one slide (paths are final, small values only)."""

    slide: str
    slide_path: Path
    output_dir: Path
    task: str
    labels: list[str]
    predicted: str | None
    slide_scores: dict[str, float]
    n_tiles: int
    mpp: float
    tile_size_um: float
    thumbnail: Path
    overview: Path
    geojson: Path
    arrays: Path
    files: list[Path]
    top: dict[str, list[TopTile]]
    bottom: dict[str, list[TopTile]]
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (paths as strings)."""
        d = asdict(self)
        return {k: _jsonable(v) for k, v in d.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- rendering


@dataclass
class _Ctx:
    job: HeatmapJob
    reader: SlideReader
    root: Path  # temp folder being filled
    coords: np.ndarray
    mpp: float
    tile_um: float
    geometry: maps.MapGeometry
    index: np.ndarray
    thumb: np.ndarray
    opacity: float
    topk: int
    bottomk: int

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def layer(self, values: np.ndarray, bar: Colourbar) -> np.ndarray:
        m = maps.paint(self.index, values)
        return maps.colourise(m, bar.cmap, bar.vmin, bar.vmax, centre=bar.centre)

    def tiles(
        self, order: np.ndarray, scores: np.ndarray, rel: np.ndarray, k: int, label: str, prefix: str
    ) -> list[TopTile]:
        """The tiles ``order`` (best first) with their boxes; the first ``k`` saved as JPEGs."""
        chosen = top_tiles(
            self.coords, order, mpp=self.mpp, tile_size_um=self.tile_um, scores=scores, relevance=rel
        )
        suffix = f"{safe_name(self.job.stem)}-{label}" if label else safe_name(self.job.stem)
        written = write_tiles(self.reader, self.root / "tiles", chosen[:k], prefix=prefix, suffix=suffix)
        return written + chosen[k:]


def _classification(ctx: _Ctx, head: Head, sc: TileScores, panels: list[Panel]) -> dict[str, Any]:
    s = safe_name(ctx.job.stem)
    labels = list(head.labels)
    _, a, b = head.groups[0]
    predicted = a + int(np.argmax(sc.slide_outputs[a:b]))
    tile_class = a + np.argmax(sc.tile_outputs[:, a:b], axis=1)
    cmap = maps.class_map(ctx.index, tile_class - a, b - a)
    ctx.write(f"raw/{s}-classmap.png", maps.png_bytes(cmap))
    panels.append(Panel("single-tile class (" + ", ".join(labels[a:b]) + ")", cmap))
    assert sc.support is not None
    score = sc.support * minmax(sc.relevance)
    bar = Colourbar("RdBu_r", -1.0, 1.0, "support x relevance")
    top: dict[str, list[TopTile]] = {}
    bottom: dict[str, list[TopTile]] = {}
    for c, label in enumerate(labels):
        name, p = safe_name(label), float(sc.slide_outputs[c])
        layer = ctx.layer(score[:, c], bar)
        ctx.write(f"raw/{s}-{name}={p:.2f}.png", maps.png_bytes(layer))
        over = maps.blend(ctx.thumb, layer, ctx.opacity)
        ctx.write(f"raw/raw-overlay-{s}-{name}.png", maps.png_bytes(over))
        title = f"{ctx.job.name}: {label} (p = {p:.2f})"
        ctx.write(f"plots/overlay-{s}-{name}.png", figures.overlay_figure(Panel(title, over, bar)))
        panels.append(Panel(f"{label} (p = {p:.2f})", layer, bar))
        k_top = ctx.topk if c == predicted else 0
        k_bottom = ctx.bottomk if c == predicted else 0
        order = rank(score[:, c], max(ctx.topk, MIN_TOP))
        top[label] = ctx.tiles(order, score[:, c], sc.relevance[:, c], k_top, name, "top")
        order = rank(score[:, c], max(ctx.bottomk, MIN_TOP), largest=False)
        bottom[label] = ctx.tiles(order, score[:, c], sc.relevance[:, c], k_bottom, name, "bottom")
    rgb = maps.class_colours(b - a)
    return {
        "predicted": labels[predicted],
        "top": top,
        "bottom": bottom,
        "measurements": {
            **{f"relevance {lab}": sc.relevance[:, c] for c, lab in enumerate(labels)},
            **{f"score {lab}": score[:, c] for c, lab in enumerate(labels)},
            **{f"p {lab}": sc.tile_outputs[:, c] for c, lab in enumerate(labels)},
        },
        "tile_class": [labels[i] for i in tile_class],
        "class_rgb": {labels[a + j]: tuple(int(v) for v in rgb[j]) for j in range(b - a)},
    }


def _single_output(
    ctx: _Ctx, head: Head, sc: TileScores, meta: dict[str, Any], panels: list[Panel]
) -> dict[str, Any]:
    s, label = safe_name(ctx.job.stem), head.labels[0]
    rel = minmax(sc.relevance[:, 0])
    cut_off = meta.get("survival_cut_off")
    if head.task == "survival" and cut_off is not None:
        values = rel * np.sign(sc.tile_outputs[:, 0] - float(cut_off))
        bar = Colourbar(
            "RdBu_r", -1.0, 1.0, f"relevance, signed by tile risk vs. median {float(cut_off):.3g}"
        )
    elif head.task == "survival":
        values, bar = rel, Colourbar("Reds", 0.0, 1.0, "relevance")
    else:
        values, bar = rel, Colourbar("magma", 0.0, 1.0, "relevance")
    layer = ctx.layer(values, bar)
    ctx.write(f"raw/{s}-heatmap.png", maps.png_bytes(layer))
    over = maps.blend(ctx.thumb, layer, ctx.opacity)
    ctx.write(f"raw/raw-overlay-{s}.png", maps.png_bytes(over))
    pred = float(sc.slide_outputs[0])
    title = f"{ctx.job.name}: {label} = {pred:.3g}"
    ctx.write(f"plots/overlay-{s}.png", figures.overlay_figure(Panel(title, over, bar)))
    panels.append(Panel(f"{label} = {pred:.3g}", layer, bar))
    name = safe_name(label)
    top = ctx.tiles(rank(rel, max(ctx.topk, MIN_TOP)), rel, sc.relevance[:, 0], ctx.topk, name, "top")
    bottom_order = rank(rel, max(ctx.bottomk, MIN_TOP), largest=False)
    bottom = ctx.tiles(bottom_order, rel, sc.relevance[:, 0], ctx.bottomk, name, "bottom")
    out_name = "prediction" if head.task == "regression" else "risk"
    return {
        "predicted": None,
        "top": {label: top},
        "bottom": {label: bottom},
        "measurements": {"relevance": sc.relevance[:, 0], f"{out_name} (tile alone)": sc.tile_outputs[:, 0]},
        "tile_class": None,
        "class_rgb": None,
    }


@cache
def heatmaps_code_version() -> str:
    """sha256 over the heatmaps package's sources."""
    return package_code_hash(Path(__file__).resolve().parent)


def _provenance(job: HeatmapJob, checkpoint_path: Path | str, settings: dict[str, Any]) -> Provenance:
    index = shared_index()
    return Provenance(
        stage="heatmaps",
        inputs={
            "slide": index.sha256(job.slide_path),
            "features": index.sha256(job.feature_path),
            "checkpoint": index.sha256(checkpoint_path),
        },
        settings={**settings, "name": job.name},
        code=heatmaps_code_version(),
    )


def _subject(job: HeatmapJob, expected: Provenance) -> Subject:
    return Subject(str(Path(job.slide_path).resolve()), str(expected.inputs["slide"]))


def check_heatmaps(job: HeatmapJob, checkpoint_path: Path | str, **settings: Any) -> Check:
    """:class:`stamp.provenance.Check` of a slide's heatmaps folder against what this run would draw."""
    expected = _provenance(job, checkpoint_path, _settings(**settings))
    return check_folder(job.output_dir, expected, subject=_subject(job, expected))


def _settings(
    opacity: float = 0.6,
    topk: int = 0,
    bottomk: int = 0,
    default_slide_mpp: float | None = None,
    ig_steps: int = IG_STEPS,
) -> dict[str, Any]:
    return {
        "opacity": float(opacity),
        "topk": int(topk),
        "bottomk": int(bottomk),
        "default_slide_mpp": default_slide_mpp,
        "ig_steps": int(ig_steps),
    }


def _render(
    job: HeatmapJob, checkpoint_path: Path | str, opacity: float, topk: int, bottomk: int,
    device: str, default_slide_mpp: float | None, ig_steps: int,
) -> SlideHeatmaps:  # fmt: skip
    start = time.perf_counter()
    model, meta, head = cached_model(checkpoint_path, device)
    feats = read_features(job.feature_path)
    note = check_features(job, feats, meta)
    assert feats.coords_um is not None and feats.tile_size_um is not None
    coords, tile_um = np.asarray(feats.coords_um, dtype=np.float64), float(feats.tile_size_um)
    with open_slide(job.slide_path) as reader:
        settings = _settings(opacity, topk, bottomk, default_slide_mpp, ig_steps)
        expected = _provenance(job, checkpoint_path, settings)
        subject = _subject(job, expected)
        check_folder(job.output_dir, expected, subject=subject).raise_if_foreign()
        recorded = feats.attrs.get("slide_sha256")
        if recorded and str(recorded) != expected.inputs["slide"]:
            raise HeatmapError(
                job.slide_path,
                f"its features {job.feature_path} were extracted from other bytes than this slide "
                "(slide_sha256 differs); run preprocess on it again",
            )
        mpp, mpp_source = slide_mpp(reader, feats, default_slide_mpp)
        check_fit(job, coords, reader.dimensions, mpp, tile_um)
        sc = score_tiles(model, head, feats.feats, coords, device=device, steps=ig_steps)
        geometry = maps.MapGeometry.for_slide(reader.dimensions, mpp, tile_um)
        thumb = reader.downsampled(geometry.width, geometry.height)
        final = job.output_dir
        with staging_dir(final) as tmp:
            ctx = _Ctx(job, reader, tmp, coords, mpp, tile_um, geometry, geometry.tile_index(coords), thumb,
                       float(opacity), int(topk), int(bottomk))  # fmt: skip
            result = _write_all(ctx, head, sc, meta)
            s = safe_name(job.stem)

            def moved(tiles: dict[str, list[TopTile]]) -> dict[str, list[TopTile]]:
                return {
                    k: [replace(t, file=str(final / "tiles" / t.file) if t.file else "") for t in v]
                    for k, v in tiles.items()
                }

            summary = SlideHeatmaps(
                slide=job.name, slide_path=job.slide_path, output_dir=final, task=head.task,
                labels=list(head.labels), predicted=result["predicted"],
                slide_scores={lab: float(v) for lab, v in zip(head.labels, sc.slide_outputs, strict=True)},
                n_tiles=len(coords), mpp=float(mpp), tile_size_um=tile_um,
                thumbnail=final / "raw" / f"thumbnail-{s}.png", overview=final / "plots" / f"overview-{s}.png",
                geojson=final / f"{s}-tiles.geojson", arrays=final / "raw" / f"{s}-arrays.npz",
                files=sorted([final / SUMMARY_NAME, *(final / p.relative_to(tmp) for p in result["files"])]),
                top=moved(result["top"]), bottom=moved(result["bottom"]),
                seconds=time.perf_counter() - start, note=note,
                extra={"map_size": [geometry.width, geometry.height], "px_per_tile": geometry.px_per_tile,
                       "mpp_source": mpp_source},
            )  # fmt: skip
            # the summary travels with the folder (covered by its record), so a rerun can serve it unread
            ctx.write(SUMMARY_NAME, _portable_summary(summary))
            publish_folder(tmp, final, expected, subject=subject)
    return summary


def finished_heatmaps(job: HeatmapJob, checkpoint_path: Path | str, **settings: Any) -> dict[str, Any] | None:
    """The summary (:meth:`SlideHeatmaps.to_dict`) of a slide whose heatmaps folder is what this run
    would draw, read back from the folder; None when it must be (re)drawn or predates the summary.

    Read-only and lock-free: a stage checks every slide this way before it starts any work.
    """
    if not check_heatmaps(job, checkpoint_path, **settings).reusable:
        return None
    try:
        stored = json.loads((job.output_dir / SUMMARY_NAME).read_bytes())
        return _placed_summary(stored, job)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # unreadable: the task draws the slide again


_PATH_FIELDS = ("thumbnail", "overview", "geojson", "arrays")


def _portable_summary(summary: SlideHeatmaps) -> bytes:
    """The summary as stored in its folder: the same bytes for the same drawing wherever the folder or
    the slide lives (paths relative to the folder; no slide path, no time taken)."""
    root = summary.output_dir

    def rel(path: str | Path) -> str:
        return Path(path).relative_to(root).as_posix() if path else ""

    d = summary.to_dict()
    for key in ("slide", "slide_path", "output_dir", "seconds"):
        d.pop(key)
    for key in _PATH_FIELDS:
        d[key] = rel(d[key])
    d["files"] = [rel(p) for p in d["files"]]
    for tiles in (d["top"], d["bottom"]):
        for entries in tiles.values():
            for tile in entries:
                tile["file"] = rel(tile["file"])
    return json.dumps(d, sort_keys=True).encode()


def _placed_summary(stored: dict[str, Any], job: HeatmapJob) -> dict[str, Any]:
    """:func:`_portable_summary` read back for ``job``: the :meth:`SlideHeatmaps.to_dict` of its folder."""
    root = job.output_dir

    def placed(rel: str) -> str:
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{SUMMARY_NAME}: a path outside its folder")
        return str(root / rel) if rel else ""

    d = dict(stored)
    for key in _PATH_FIELDS:
        d[key] = placed(d[key])
    d["files"] = [placed(p) for p in d["files"]]
    d["top"], d["bottom"] = (
        {k: [{**t, "file": placed(t["file"])} for t in v] for k, v in tiles.items()}
        for tiles in (d["top"], d["bottom"])
    )
    return {
        "slide": job.name,
        "slide_path": str(job.slide_path),
        "output_dir": str(root),
        **d,
        "seconds": 0.0,
    }


def _write_all(ctx: _Ctx, head: Head, sc: TileScores, meta: dict[str, Any]) -> dict[str, Any]:
    s = safe_name(ctx.job.stem)
    ctx.write(f"raw/thumbnail-{s}.png", maps.png_bytes(ctx.thumb))
    panels = [Panel("thumbnail", ctx.thumb)]
    if head.task == "classification":
        result = _classification(ctx, head, sc, panels)
    else:
        result = _single_output(ctx, head, sc, meta, panels)
    measurements = dict(result["measurements"])
    if sc.attention is not None:
        bar = Colourbar("viridis", 0.0, 1.0, "attention (min-max)")
        layer = ctx.layer(minmax(sc.attention), bar)
        ctx.write(f"raw/{s}-attention.png", maps.png_bytes(layer))
        panels.append(Panel("attention", layer, bar))
        measurements["attention"] = sc.attention
    ctx.write(f"plots/overview-{s}.png", figures.overview_figure(ctx.job.name, panels))
    geo = geojson_text(
        ctx.coords, mpp=ctx.mpp, tile_size_um=ctx.tile_um, measurements=measurements,
        tile_class=result["tile_class"], class_rgb=result["class_rgb"],
    )  # fmt: skip
    ctx.write(f"{s}-tiles.geojson", geo.encode())
    save_arrays(
        ctx.root / "raw" / f"{s}-arrays.npz",
        coords_um=ctx.coords, labels=np.array(head.labels), relevance_raw=sc.relevance_raw,
        relevance=sc.relevance, relevance_signed=sc.relevance_signed, tile_outputs=sc.tile_outputs,
        slide_outputs=sc.slide_outputs, support=sc.support, attention=sc.attention, mpp=ctx.mpp,
        tile_size_um=ctx.tile_um,
    )  # fmt: skip
    result["files"] = [p for p in ctx.root.rglob("*") if p.is_file()]
    return result


def render_slide(
    job: HeatmapJob,
    checkpoint_path: Path | str,
    *,
    opacity: float = 0.6,
    topk: int = 0,
    bottomk: int = 0,
    device: str | None = None,
    default_slide_mpp: float | None = None,
    ig_steps: int = IG_STEPS,
) -> SlideHeatmaps:
    """Write one slide's heatmaps to ``job.output_dir``; raise a one-line :class:`HeatmapError` on failure.

    ``ig_steps``: path points of the relevance (1 = STAMP's plain gradient × input; see
    :mod:`stamp.heatmaps.relevance`). The returned :class:`SlideHeatmaps` holds paths and small values.
    """
    try:
        dev = resolve_device(device)
        return _render(job, checkpoint_path, opacity, topk, bottomk, dev, default_slide_mpp, ig_steps)
    except HeatmapError:
        raise
    except ForeignOutput as exc:
        raise HeatmapError(job.slide_path, f"{exc}; no heatmaps written for it") from exc
    except SlideError as exc:
        raise HeatmapError(job.slide_path, exc.reason) from exc
    except (
        FeatureFileError,
        CheckpointError,
        ValueError,
        OSError,
        RuntimeError,
        KeyError,
        MemoryError,
    ) as exc:
        raise HeatmapError(job.slide_path, str(exc) or type(exc).__name__) from exc
