"""Tile-encoder registry: what each encoder is, where its weights come from, how to build it.

Every entry is an :class:`EncoderSpec` (pure data: no torch import here, so listing
the registry is instant) plus a :class:`Family` of hooks that build the network and
load a state dict into it. Every module of :mod:`stamp.encoders.families`
(``timm_vit.py``, ``ctranspath.py``, ``conch.py`` ...) is imported when this module is,
and declares its specs with :func:`register`; they import torch/timm only inside their
hooks. Adding a family is adding a file there: no list names the families.

Names are the values ``preprocessing.extractor`` accepts (the config schema asks this
registry): STAMP's (:data:`STAMP_ENCODER_NAMES`) plus ``demo``, a weight-free encoder
for the demo and tests. ``dim`` and ``n_params`` are declared here and checked against
the built architecture by the tests (on the meta device). ``mpp`` and ``tile_px`` are
the operating point that :func:`check_operating_point` compares a config with.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from stamp.encoders.errors import UnknownEncoderError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]
Interpolation = Literal["bilinear", "bicubic"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

#: STAMP's default tile geometry (``tile_size_um`` 256 at ``tile_size_px`` 224).
STAMP_DEFAULT_MPP = 256 / 224


@dataclass(frozen=True)
class InputSpec:
    """The input transform, applied in torch on a uint8 batch (see :mod:`stamp.encoders.transforms`).

    ``resize_px``: target of the resize (``None``: no resize). ``resize_mode``
    ``"shorter"`` scales the shorter side to ``resize_px`` keeping the aspect ratio
    (torchvision ``Resize(int)``), ``"square"`` resizes to ``resize_px``²
    (``Resize((n, n))``). ``crop_px``: centre crop after the resize (``None``: none).
    """

    resize_px: int | None
    crop_px: int | None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Interpolation = "bilinear"
    resize_mode: Literal["shorter", "square"] = "shorter"

    @property
    def out_px(self) -> int | None:
        """Side of the square the network sees (``None`` if it depends on the tile)."""
        if self.crop_px is not None:
            return self.crop_px
        return self.resize_px

    def describe(self) -> str:
        parts = []
        if self.resize_px:
            parts.append(
                f"resize {self.resize_px}{'²' if self.resize_mode == 'square' else ''} {self.interpolation}"
            )
        if self.crop_px:
            parts.append(f"crop {self.crop_px}")
        parts.append(
            f"mean {tuple(round(m, 4) for m in self.mean)} std {tuple(round(s, 4) for s in self.std)}"
        )
        return ", ".join(parts)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a Hugging Face repo at a pinned revision, or a URL.

    ``files`` maps each file the encoder needs (path inside the repo) to its sha256,
    or ``None`` where no digest is known ("unverified"). ``url`` is ``https://...``
    or ``gdrive:<file id>`` (Google Drive). ``digest_source`` says where the digests
    were taken from. ``legacy_cache`` names the file STAMP keeps in
    ``~/.cache/stamp`` so an existing STAMP download is found (first file only).
    """

    files: Mapping[str, str | None]
    hf_repo: str | None = None
    revision: str | None = None
    url: str | None = None
    digest_source: str | None = None
    legacy_cache: str | None = None

    def __post_init__(self) -> None:
        if (self.hf_repo is None) == (self.url is None):
            raise ValueError("WeightsSource needs exactly one of hf_repo or url")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))

    @property
    def location(self) -> str:
        if self.hf_repo:
            rev = self.revision[:8] if self.revision else "unpinned"
            return f"hf:{self.hf_repo}@{rev}"
        return str(self.url)

    @property
    def verified(self) -> bool:
        return all(v is not None for v in self.files.values())


@dataclass(frozen=True)
class EncoderSpec:
    """One tile encoder's operating point, provenance and governance facts."""

    name: str
    family: str
    dim: int
    input: InputSpec
    n_params: int | None
    tile_px: int
    mpp: float | None
    precision: Precision
    weights: WeightsSource | None
    license: str
    gated: bool
    extra: str | None = None
    research_use: bool = True
    #: how the network is built: "timm" (timm_arch + timm_kwargs), "native" (our own
    #: module in the family file), "transformers" (hf_class), "vendor" (vendor_package)
    builder: str = "timm"
    timm_arch: str | None = None
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    hf_class: str | None = None
    vendor_package: str | None = None
    #: encoders whose weights this one also needs (e.g. ticon needs h-optimus-1)
    components: tuple[str, ...] = ()
    #: the STAMP/paper reference for the nominal parameter count (model card etc.)
    params_note: str = ""
    #: STAMP-specific behaviour worth knowing (e.g. virchow2 is CLS-only like STAMP)
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(
                f"encoder {self.name!r}: precision must be fp32, fp16 or bf16, not {self.precision!r}"
            )

    @property
    def mpp_text(self) -> str:
        return "-" if self.mpp is None else f"{self.mpp:g}"


@dataclass(frozen=True)
class Family:
    """Hooks of one model family.

    ``build(spec)`` returns the network in eval mode with random weights; its forward
    maps a normalised float batch (N, 3, H, W) to (N, dim). It may raise
    :class:`~stamp.encoders.errors.MissingExtraError`. ``build_equivalent(spec)``
    (optional) builds a shape-equivalent network without the vendor package, used by
    the tests to check dims and parameter counts. ``load_weights(model, files, spec)``
    loads the resolved weight files (``{filename: path}``) into the built model.
    Component files (``EncoderSpec.components``) are passed as ``"<component>/<file>"``.
    """

    build: Callable[[EncoderSpec], nn.Module]
    load_weights: Callable[[nn.Module, Mapping[str, Path], EncoderSpec], None] | None = None
    build_equivalent: Callable[[EncoderSpec], nn.Module] | None = None
    #: for vendor code that builds the network from its own files (e.g. remote code):
    #: ``load(spec, files) -> nn.Module`` replaces build + load_weights in load_encoder
    load: Callable[[EncoderSpec, Mapping[str, Path]], nn.Module] | None = None
    #: the family executes code shipped with its weights (``trust_remote_code``): load_encoder
    #: then requires a pinned sha256 for every file and loads from a private, verified copy
    remote_code: bool = False


_SPECS: dict[str, EncoderSpec] = {}
_FAMILIES: dict[str, Family] = {}

#: name -> spec, read-only view in registration order.
ENCODERS: Mapping[str, EncoderSpec] = MappingProxyType(_SPECS)

#: the 19 ``preprocessing.extractor`` values of STAMP 2.5 besides ``empty`` (a fact about STAMP,
#: reference/stamp-facts.md §2.2; the registry holds each of them, tests check it)
STAMP_ENCODER_NAMES: tuple[str, ...] = (
    "ctranspath",
    "chief-ctranspath",
    "conch",
    "conch1_5",
    "uni",
    "uni2",
    "dino-bloom",
    "gigapath",
    "h-optimus-0",
    "h-optimus-1",
    "virchow",
    "virchow-full",
    "virchow2",
    "musk",
    "mstar",
    "plip",
    "keep",
    "ticon",
    "red-dino",
)

#: the config's µm/px and the encoder's ``mpp`` disagree when one exceeds the other by more than this
#: factor. Scanners' "20x" ranges over about ±10% of 0.5 µm/px and STAMP's default 256 µm / 224 px
#: (1.14 µm/px) is its 10x (1.0 µm/px) setting; magnifications are 2x apart.
MPP_TOLERANCE = 1.2


def register(spec: EncoderSpec, family: Family, *, replace: bool = False) -> EncoderSpec:
    """Add an encoder to the registry. ``replace=True`` lets tests swap an entry."""
    if spec.name in _SPECS and not replace:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    _FAMILIES[spec.name] = family
    return spec


def unregister(name: str) -> None:
    """Remove an entry (tests only)."""
    _SPECS.pop(name, None)
    _FAMILIES.pop(name, None)


def get_spec(name: str) -> EncoderSpec:
    """The spec of ``name``; an unknown name raises an error listing the valid ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownEncoderError(name, sorted(_SPECS)) from None


def get_family(name: str) -> Family:
    get_spec(name)
    return _FAMILIES[name]


def build_architecture(name: str, *, equivalent: bool = False) -> nn.Module:
    """The encoder's network with random weights, on torch's current default device.

    Call it under ``with torch.device("meta"):`` to get shapes without memory.
    ``equivalent=True`` uses the family's vendor-free shape-equivalent build if it
    has one (for dims / parameter counts of vendor encoders).
    """
    spec = get_spec(name)
    fam = _FAMILIES[name]
    if equivalent and fam.build_equivalent is not None:
        return fam.build_equivalent(spec)
    return fam.build(spec)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    if n == 0:
        return "0"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k"


def encoder_table(names: list[str] | None = None) -> str:
    """A printable, aligned table of the registry (one row per encoder)."""
    header = (
        "name",
        "family",
        "dim",
        "params",
        "tile px",
        "mpp",
        "precision",
        "weights",
        "sha256",
        "licence",
        "gated",
        "extra",
    )
    rows = [header]
    for name in names or list(_SPECS):
        s = get_spec(name)
        if s.weights is None:
            src, digest = "none (weight-free)", "-"
        else:
            src = s.weights.location
            known = [v is not None for v in s.weights.files.values()]
            digest = "pinned" if all(known) else "partial" if any(known) else "unverified"
        licence = s.license if s.research_use else f"{s.license}; NOT FOR RESEARCH USE"
        rows.append(
            (
                s.name,
                s.family,
                str(s.dim),
                _fmt_params(s.n_params),
                str(s.tile_px),
                s.mpp_text,
                s.precision,
                src,
                digest,
                licence,
                "yes" if s.gated else "no",
                s.extra or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_operating_point(extractor: str, tile_size_um: float, tile_size_px: int) -> str | None:
    """How tiles of ``tile_size_um`` µm at ``tile_size_px`` px miss the encoder's operating point, or ``None``.

    The tiles' scale is ``tile_size_um / tile_size_px`` µm/px; it disagrees with the encoder's
    declared ``mpp`` when the larger of the two is more than :data:`MPP_TOLERANCE` times the
    smaller, and ``tile_size_px`` must equal its ``tile_px``. An encoder with ``mpp=None`` (weight-free, or no known scale) is not
    checked. The answer is one line naming both sides and the values that would match.
    """
    spec = get_spec(extractor)
    if spec.mpp is None:
        return None
    mpp = tile_size_um / tile_size_px
    if max(mpp / spec.mpp, spec.mpp / mpp) <= MPP_TOLERANCE and tile_size_px == spec.tile_px:
        return None
    return (
        f"preprocessing.tile_size_um/tile_size_px = {tile_size_um:g}/{tile_size_px} → {mpp:.3g} µm/px, "
        f"but extractor {extractor!r} was trained at {spec.mpp:.3g} µm/px, {spec.tile_px} px "
        f"(tile_size_um: {spec.mpp * spec.tile_px:g} and tile_size_px: {spec.tile_px} match it)"
    )


def _load_families() -> None:
    """Import every module of :mod:`stamp.encoders.families` (each registers its encoders).

    Modules whose name starts with ``_`` are helpers, not families, and are left alone.
    """
    from stamp.encoders import families

    for module in pkgutil.iter_modules(families.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{families.__name__}.{module.name}")


_load_families()
