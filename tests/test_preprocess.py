"""The per-slide preprocessing stage as a plain function (no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stamp.encoders import load_encoder
from stamp.features import read_features
from stamp.preprocessing import PreprocessParams, SlideFailed, extract_slide, output_paths
from stamp.slides import TilingParams
from stamp.synthetic import SlideSpec, write_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("one") / "pos.svs"
    write_slide(path, SlideSpec(width=3072, height=2560, mpp=0.25, planted_fraction=0.3, seed=5))
    return path


@pytest.fixture(scope="module")
def encoder():  # noqa: ANN201
    return load_encoder("demo")


def test_same_slide_same_bytes_whatever_the_threads(slide: Path, encoder, tmp_path: Path) -> None:  # noqa: ANN001
    outs = []
    for workers, batch in ((1, 7), (4, 7)):
        params = PreprocessParams(
            extractor="demo", tiling=TilingParams(max_workers=workers), batch_size=batch
        )
        outs.append(extract_slide(slide, tmp_path / f"w{workers}.h5", params, encoder, slide_sha256="s"))
    a, b = (Path(r.h5).read_bytes() for r in outs)
    assert a == b, "features must not depend on reader thread timing"
    assert outs[0].tiles_kept > 0 and outs[0].read_level == 1  # 0.25 µm/px slide → level 1 for 1.14 µm/px


def test_stain_norm_params_recorded(slide: Path, encoder, tmp_path: Path) -> None:  # noqa: ANN001
    plain = PreprocessParams(extractor="demo")
    normed = PreprocessParams(extractor="demo", stain_norm="macenko")
    r0 = extract_slide(slide, tmp_path / "plain.h5", plain, encoder)
    r1 = extract_slide(slide, tmp_path / "macenko.h5", normed, encoder)
    f0, f1 = read_features(r0.h5), read_features(r1.h5)
    assert f1.attrs["stain_norm"] == "macenko" and json.loads(f1.attrs["stain_params"])["method"] == "macenko"
    assert f0.attrs["stain_norm"] == "none" and "stain_params" not in f0.attrs
    np.testing.assert_array_equal(f0.coords_um, f1.coords_um)
    assert not np.array_equal(f0.feats, f1.feats), "normalised tiles must give other features"
    assert plain.digest() != normed.digest()


def test_failure_leaves_nothing_behind(tmp_path: Path, encoder) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    h5 = tmp_path / "out" / "bad.h5"
    with pytest.raises(SlideFailed, match="bad.svs: not a slide"):
        extract_slide(bad, h5, PreprocessParams(extractor="demo"), encoder)
    assert not any(p.exists() for p in output_paths(h5).values())


def test_finished_outputs_are_reused_only_with_the_same_provenance(
    slide: Path, encoder, tmp_path: Path
) -> None:  # noqa: ANN001
    from dataclasses import replace

    from stamp.preprocessing import check_slide_outputs, process_slide, slide_provenance

    params = PreprocessParams(extractor="demo", tiling=TilingParams(max_workers=2))
    h5 = tmp_path / "pos.h5"
    code = "c0de" * 16
    done = extract_slide(slide, h5, params, encoder, slide_sha256="abc", code_hash_hex=code)
    expected = slide_provenance("abc", params, encoder.weights_sha256, code)
    assert check_slide_outputs(slide, h5, expected).reusable
    reused = process_slide(slide, h5, params, encoder, slide_sha256="abc", code=code)
    assert reused.status == "reused" and reused.h5 == str(h5)
    assert reused.tiles_kept == done.tiles_kept and reused.mpp_effective == pytest.approx(done.mpp_effective)
    assert reused.outputs == done.outputs and set(done.outputs) == {"pos.h5", "pos.jpg", "pos.tissue.geojson"}
    other = replace(params, tiling=TilingParams(tile_size_um=200.0))
    for why, prov in {
        "other parameters": slide_provenance("abc", other, encoder.weights_sha256, code),
        "other slide bytes": slide_provenance("other slide", params, encoder.weights_sha256, code),
        "other weights": slide_provenance("abc", params, "other weights", code),
        "other code": slide_provenance("abc", params, encoder.weights_sha256, "f" * 64),
    }.items():
        check = check_slide_outputs(slide, h5, prov)
        assert check.verdict.value == "stale", why
    output_paths(h5)["thumbnail"].unlink()
    check = check_slide_outputs(slide, h5, expected)
    assert check.verdict.value == "stale" and "pos.jpg is missing" in check.reason
    again = process_slide(slide, h5, params, encoder, slide_sha256="abc", code=code)
    assert again.status == "done" and output_paths(h5)["thumbnail"].is_file()
