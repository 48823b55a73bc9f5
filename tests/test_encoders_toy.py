"""Adding a tile encoder is one family file and nothing else (CONTRIBUTING "Add a tile encoder").

A toy family and its spec, defined here and registered at run time — no other file is touched — are
accepted by the config (at their own operating point, strictly checked), listed by ``stamp encoders``,
and run through ``stamp preprocess`` and the cohort flow (``stamp run``) on a synthetic cohort.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from stamp.cli import main
from stamp.config import ConfigError, load_config
from stamp.encoders import encoder_table
from stamp.encoders.registry import EncoderSpec, Family, InputSpec, register, unregister
from stamp.synthetic import write_cohort

pytestmark = pytest.mark.usefixtures("prefect_api")

TOY = "test-toy-channel-stats"
TILE_PX = 32
MPP = 2.0  # the toy's operating point: 64 µm tiles at 32 px


def build(spec: EncoderSpec):
    """Per-channel mean and standard deviation of the (normalised) tile: 6 features."""
    import torch
    from torch import nn

    class ChannelStats(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    return ChannelStats().eval()


SPEC = EncoderSpec(
    name=TOY,
    family="test-toy",
    builder="native",
    dim=6,
    n_params=0,
    input=InputSpec(TILE_PX, TILE_PX, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    tile_px=TILE_PX,
    mpp=MPP,
    precision="fp32",
    weights=None,
    license="test",
    gated=False,
    research_use=False,
)


@pytest.fixture
def toy():
    register(SPEC, Family(build=build))
    yield SPEC
    unregister(TOY)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy-cohort")
    write_cohort(root, n_patients=2, seed=11, size=1024, variants=False)
    return root / "slides"


def _config(path: Path, slides: Path, out: Path) -> Path:
    section = {
        "output_dir": str(out),
        "wsi_dir": str(slides),
        "extractor": TOY,
        "tile_size_um": MPP * TILE_PX,
        "tile_size_px": TILE_PX,
        "strict_operating_point": True,
        "max_workers": 1,
        "device": "cpu",
    }
    path.write_text(yaml.safe_dump({"preprocessing": section}))
    return path


def _check_features(out: Path, slides: Path) -> None:
    (feat_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(f"{TOY}-")]
    h5s = sorted(feat_dir.rglob("*.h5"))
    assert len(h5s) == len(list(slides.rglob("*.svs"))) > 0
    for h5 in h5s:
        with h5py.File(h5) as f:
            assert f.attrs["extractor"] == TOY
            assert f.attrs["tile_size_um"] == MPP * TILE_PX and f.attrs["tile_size_px"] == TILE_PX
            feats = f["feats"][()].astype(np.float32)
        assert feats.ndim == 2 and feats.shape[1] == 6 and len(feats) > 0
        means = feats[:, :3]
        assert ((means > 0) & (means < 1)).all()  # tissue tiles: neither black nor blank white
        assert np.ptp(means, axis=0).max() > 0  # the features follow the tiles


def test_toy_encoder_runs_through_cli_and_cohort_flow(
    toy: EncoderSpec, slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert any(line.split()[0] == TOY for line in encoder_table().splitlines()[2:])
    cfg = _config(tmp_path / "config.yaml", slides, tmp_path / "features")
    assert load_config(cfg).preprocessing is not None  # strict: the toy's operating point is met
    assert main(["-c", str(cfg), "preprocess"]) == 0
    _check_features(tmp_path / "features", slides)

    cohort_cfg = _config(tmp_path / "cohort.yaml", slides, tmp_path / "cohort-features")
    assert main(["-c", str(cohort_cfg), "run", "--stages", "preprocess"]) == 0
    assert "| preprocess | completed |" in capsys.readouterr().out
    _check_features(tmp_path / "cohort-features", slides)


def test_toy_operating_point_is_enforced(toy: EncoderSpec, tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "preprocessing": {
                    "output_dir": "o",
                    "wsi_dir": "w",
                    "extractor": TOY,
                    "strict_operating_point": True,
                }
            }
        )
    )
    with pytest.raises(ConfigError, match=f"extractor '{TOY}' was trained at 2 µm/px, 32 px"):
        load_config(cfg)


def test_unregistered_toy_is_an_unknown_extractor(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "config.yaml", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match=f"preprocessing.extractor: expected one of .* got '{TOY}'"):
        load_config(cfg)
