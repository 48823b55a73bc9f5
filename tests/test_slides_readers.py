"""Readers (OpenSlide / tifffile), the auto fallback, error reasons, and MPP resolution."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from stamp.slides import MPPError, SlideOpenError, open_slide, resolve_mpp
from stamp.synthetic import SlideSpec, write_slide
from tests.test_slides_support import (
    make_image,
    write_aperio,
    write_generic,
    write_ome_subifd,
    write_stripped,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("readers")
    img = make_image(1500, 1000, seed=3)
    out = {
        "aperio": write_aperio(d / "aperio.svs", img, mpp=0.25, downsamples=(1, 4)),
        "stripped": write_stripped(d / "stripped.tif", img),
        "ome": write_ome_subifd(d / "pyr.ome.tif", img, mpp=0.5),
        "ome_nm": write_ome_subifd(d / "nm.ome.tif", img, mpp=500.0, unit="nm"),
        "pixelsize": write_generic(
            d / "pixelsize.tif", img, description="<Scan><PixelSizeMicrons>0.7</PixelSizeMicrons></Scan>"
        ),
        "generic_res": write_generic(d / "generic.tif", img, mpp=0.33),
        "generic_nompp": write_generic(d / "nompp.tif", img),
        "stripped_aperio_desc": write_stripped(
            d / "stripped_aperio.tif", img, description="Aperio Image|MPP = 0.46"
        ),
        "stripped_res": write_stripped(d / "stripped_res.tif", img, mpp=2.0),
    }
    bad = d / "not_a_slide.svs"
    bad.write_text("hello, I am text with a slide suffix\n" * 10)
    out["not_a_slide"] = bad
    empty = d / "empty.svs"
    empty.write_bytes(b"")
    out["empty"] = empty
    trunc = d / "truncated.svs"
    data = out["aperio"].read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    out["truncated"] = trunc
    out["img"] = d / "img.npy"
    np.save(out["img"], img)
    return out


def _img(files: dict[str, Path]) -> np.ndarray:
    return np.load(files["img"])


# --------------------------------------------------------------------------- readers


def test_aperio_via_openslide(files: dict[str, Path]) -> None:
    with open_slide(files["aperio"]) as r:
        assert r.name == "openslide"
        assert r.properties["openslide.vendor"] == "aperio"
        assert r.dimensions == (1500, 1000)
        assert r.level_count == 2 and r.level_downsamples[1] == pytest.approx(4.0)
        region = r.read_region(100, 200, 0, 300, 150)
        assert region.shape == (150, 300, 3) and region.dtype == np.uint8
        ref = _img(files)[200:350, 100:400].astype(int)
        assert np.abs(region.astype(int) - ref).mean() < 3  # JPEG Q90


def test_tifffile_matches_openslide_on_aperio(files: dict[str, Path]) -> None:
    with (
        open_slide(files["aperio"], reader="tifffile") as tf,
        open_slide(files["aperio"], reader="openslide") as os_,
    ):
        assert tf.name == "tifffile"
        assert tf.level_count == 2  # level 1 recovered although tifffile calls that page the thumbnail
        for level, (x, y, w, h) in [(0, (333, 251, 700, 500)), (1, (0, 0, 375, 250))]:
            a = tf.read_region(x, y, level, w, h).astype(int)
            b = os_.read_region(x, y, level, w, h).astype(int)
            assert np.abs(a - b).max() <= 2, level
            assert np.abs(a - b).mean() < 0.1, level


def test_fast_reader_decodes_with_tifffile(files: dict[str, Path], tmp_path: Path) -> None:
    truth = write_slide(tmp_path / "s.svs", SlideSpec(width=1500, height=1100, mpp=0.25, seed=3))
    for path in (files["aperio"], truth.slide_path):
        with open_slide(path, reader="fast") as fast, open_slide(path, reader="openslide") as ref:
            assert fast.name == "tifffile" and "reader=fast" in fast.note
            assert fast.level_dimensions == ref.level_dimensions
            assert fast.properties["openslide.vendor"] == "aperio"
            assert resolve_mpp(fast) == resolve_mpp(ref) == (0.25, "openslide.mpp-x")
            for level in range(ref.level_count):
                # origin 0: no sub-pixel offset at non-integer downsamples (OpenSlide interpolates those)
                a = fast.read_region(0, 0, level, 300, 200).astype(int)
                b = ref.read_region(0, 0, level, 300, 200).astype(int)
                assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.1
    with open_slide(files["stripped"], reader="fast") as r:  # OpenSlide refuses: plain fallback
        assert r.name == "tifffile" and "refused" in r.note


def test_stripped_tiff_falls_back_to_tifffile_lossless(files: dict[str, Path]) -> None:
    with open_slide(files["stripped"]) as r:
        assert r.name == "tifffile"
        assert "OpenSlide refused it" in r.note
        assert r.level_count == 1
        np.testing.assert_array_equal(r.read_region(10, 20, 0, 640, 480), _img(files)[20:500, 10:650])


def test_ome_subifd_pyramid_prefers_tifffile(files: dict[str, Path]) -> None:
    with open_slide(files["ome"]) as r:
        assert r.name == "tifffile"
        assert "SubIFD" in r.note
        assert r.level_count == 2
        assert r.level_downsamples[1] == pytest.approx(4.0)
        lvl1 = r.read_region(0, 0, 1, 375, 250).astype(int)
        ref = _img(files)
        import cv2

        ref1 = cv2.resize(ref, (375, 250), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(lvl1 - ref1).mean() < 3
    with open_slide(files["ome"], reader="openslide") as r:
        assert r.name == "openslide" and r.level_count == 1


def test_outside_is_white_and_partial(files: dict[str, Path]) -> None:
    for reader in ("openslide", "tifffile"):
        with open_slide(files["aperio"], reader=reader) as r:
            out = r.read_region(1400, 900, 0, 300, 200)
            assert (out[150:, :] == 255).all() and (out[:, 150:] == 255).all(), reader
            assert (out[:100, :100] != 255).any(), reader
            assert (r.read_region(5000, 5000, 0, 10, 10) == 255).all()
            assert (r.read_region(-20, -20, 0, 10, 10) == 255).all()


def test_thumbnail_and_downsampled(files: dict[str, Path]) -> None:
    with open_slide(files["aperio"]) as r:
        th = r.thumbnail(300)
        assert th.shape == (200, 300, 3)
        ref = r.read_region(0, 0, 0, 1500, 1000)
        import cv2

        assert (
            np.abs(
                th.astype(int) - cv2.resize(ref, (300, 200), interpolation=cv2.INTER_AREA).astype(int)
            ).mean()
            < 2
        )
        assert r.downsampled(64, 48).shape == (48, 64, 3)


@pytest.mark.parametrize("key", ["stripped", "aperio"])
def test_thumbnail_blockwise_path(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    import stamp.slides.reader_base as reader_base

    with open_slide(files[key], reader="tifffile") as r:
        whole = r.downsampled(150, 100)
        monkeypatch.setattr(reader_base, "WHOLE_LEVEL_READ_PX", 1000)
        monkeypatch.setattr(reader_base, "BLOCK_PX", 256)
        blocks = r.downsampled(150, 100)
        assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 1.5


def test_tifffile_reader_thread_safe(files: dict[str, Path]) -> None:
    with open_slide(files["aperio"], reader="tifffile") as r:
        rng = np.random.default_rng(0)
        boxes = [(int(rng.integers(0, 1400)), int(rng.integers(0, 900)), 200, 150) for _ in range(40)]
        seq = [r.read_region(x, y, 0, w, h) for x, y, w, h in boxes]
        r._cache.clear()
        r._cache_bytes = 0
        with ThreadPoolExecutor(8) as ex:
            par = list(ex.map(lambda b: r.read_region(b[0], b[1], 0, b[2], b[3]), boxes))
        for a, b in zip(seq, par, strict=True):
            np.testing.assert_array_equal(a, b)
        assert threading.active_count() >= 1


# --------------------------------------------------------------------------- errors


def test_explicit_reader_is_authoritative(files: dict[str, Path]) -> None:
    with pytest.raises(SlideOpenError, match="not a format OpenSlide can read"):
        open_slide(files["stripped"], reader="openslide")
    with pytest.raises(SlideOpenError, match="not a TIFF"):
        open_slide(files["not_a_slide"], reader="tifffile")
    with pytest.raises(ValueError, match="unknown slide reader"):
        open_slide(files["aperio"], reader="pillow")


@pytest.mark.parametrize("reader", ["auto", "openslide", "tifffile"])
def test_error_reasons(files: dict[str, Path], reader: str) -> None:
    with pytest.raises(SlideOpenError, match="truncated/corrupt") as e:
        open_slide(files["truncated"], reader=reader)
    assert "\n" not in e.value.reason
    with pytest.raises(SlideOpenError, match="file not found"):
        open_slide(files["aperio"].with_name("nope.svs"), reader=reader)
    with pytest.raises(SlideOpenError, match="empty file"):
        open_slide(files["empty"], reader=reader)


def test_not_a_slide_reason(files: dict[str, Path]) -> None:
    with pytest.raises(SlideOpenError) as e:
        open_slide(files["not_a_slide"])
    assert e.value.reason == "not a slide OpenSlide or tifffile can read"
    assert str(e.value).startswith(str(files["not_a_slide"]))


def test_synthetic_slide_opens_as_aperio(tmp_path: Path) -> None:
    """The synthetic slide writer's output opens as aperio with its mpp."""
    truth = write_slide(tmp_path / "s.svs", SlideSpec(width=1024, height=768, mpp=0.5, seed=2))
    with open_slide(truth.slide_path) as r:
        assert r.name == "openslide" and r.properties["openslide.vendor"] == "aperio"
        assert resolve_mpp(r, None) == (pytest.approx(0.5), "openslide.mpp-x")


# --------------------------------------------------------------------------- mpp


@pytest.mark.parametrize(
    ("key", "reader", "mpp", "source"),
    [
        ("aperio", "openslide", 0.25, "openslide.mpp-x"),
        ("aperio", "tifffile", 0.25, "aperio.MPP"),
        ("generic_res", "openslide", 0.33, "openslide.mpp-x"),
        ("generic_res", "tifffile", 0.33, "tiff.resolution"),
        ("pixelsize", "openslide", 0.7, "PixelSizeMicrons"),
        ("pixelsize", "tifffile", 0.7, "PixelSizeMicrons"),
        ("ome", "openslide", 0.5, "OME PhysicalSizeX"),
        ("ome", "tifffile", 0.5, "OME PhysicalSizeX"),
        ("ome_nm", "tifffile", 0.5, "OME PhysicalSizeX"),  # 500 nm
        ("stripped_aperio_desc", "auto", 0.46, "aperio.MPP"),
        ("stripped_res", "auto", 2.0, "tiff.resolution"),
    ],
)
def test_mpp_sources(files: dict[str, Path], key: str, reader: str, mpp: float, source: str) -> None:
    with open_slide(files[key], reader=reader) as r:
        got, src = resolve_mpp(r, default_slide_mpp=9.9)
    assert got == pytest.approx(mpp)
    assert src == source


def test_mpp_default_with_warning(files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with open_slide(files["generic_nompp"]) as r:
        with caplog.at_level(logging.WARNING, logger="stamp"):
            assert resolve_mpp(r, 0.5) == (0.5, "default_slide_mpp")
        assert "default_slide_mpp" in caplog.text
        with pytest.raises(MPPError) as e:
            resolve_mpp(r, None)
    msg = str(e.value)
    assert "nompp.tif" in msg and "set preprocessing.default_slide_mpp" in msg and "\n" not in msg
