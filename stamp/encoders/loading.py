"""Load an encoder (architecture + verified weights) and run it on uint8 tile batches.

``load_encoder(name)`` builds the network, resolves its weight files locally
(:mod:`stamp.encoders.weights`), checks their sha256 against the lock, loads the state
dict (safetensors, or ``torch.load(weights_only=True)``), and returns an
:class:`Encoder` in eval mode on the requested device.

``Encoder.encode`` runs batched under ``torch.inference_mode``; autocast to the
encoder's precision is used on CUDA only (bf16 autocast on a CPU without native bf16
is 10-30x slower than fp32), and features come back as float16 (STAMP's storage).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from stamp.encoders.errors import WeightsDigestError
from stamp.encoders.registry import EncoderSpec, get_family, get_spec
from stamp.encoders.weights import (
    Lock,
    combined_digest,
    load_lock,
    resolve_weights,
    verified_private_copy,
    verify_files,
)

if TYPE_CHECKING:  # torch is imported when an encoder is built, not with this module
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def read_state_dict(path: str | os.PathLike[str], *, trusted_sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint: safetensors directly, pickles with ``weights_only=True``.

    ``trusted_sha256`` (the locked digest the file matched) allows falling back to a
    full unpickle for old checkpoints that hold non-tensor objects; the bytes are
    read once and unpickled only if they still have that digest (a file swapped after
    verification is refused). An unverified file is never fully unpickled.
    """
    import torch

    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        if trusted_sha256 is None:
            raise ValueError(
                f"cannot read {p} with weights_only=True ({type(e).__name__}: {e}); "
                "a full unpickle is only allowed for files whose sha256 is pinned in the weights lock"
            ) from e
        data = p.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != trusted_sha256:
            raise WeightsDigestError(p, trusted_sha256, actual) from None
        log.warning("reading %s with weights_only=False (its sha256 matched the lock)", p)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming what did not match."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{what}: state dict does not match the architecture "
            f"(missing {len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]})"
        )


class Encoder:
    """A loaded tile encoder: ``encode(uint8 tiles) -> float16 features``."""

    def __init__(
        self,
        spec: EncoderSpec,
        model: nn.Module | None,
        *,
        device: torch.device | str,
        weights_sha256: str,
        file_digests: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dim = spec.dim
        self.model = model  # None only for a 0-dim encoder (``empty``): nothing to run
        self._device = device
        self.precision = spec.precision
        self.weights_sha256 = weights_sha256
        self.file_digests = dict(file_digests or {})

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dim={self.dim}, device={self.device}, weights_sha256={self.weights_sha256[:12]}…)"

    @property
    def device(self) -> torch.device:
        """The device the model runs on."""
        import torch

        return torch.device(self._device)

    @property
    def research_use(self) -> bool:
        return self.spec.research_use

    @property
    def preferred_batch_size(self) -> int:
        """A batch size that keeps the device busy without exhausting memory (tunable by the caller)."""
        if self.dim == 0:
            return 1024
        if self.spec.builder == "native" and self.spec.family == "demo":
            return 256
        n = self.spec.n_params or 0
        px = self.spec.input.out_px or self.spec.tile_px
        if self.device.type == "cuda":
            base = 512 if n < 100e6 else 256 if n < 700e6 else 128
            return max(16, int(base * (224 / px) ** 2))
        return 32 if n < 100e6 else 16

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the spec's precision on CUDA; a no-op elsewhere (and for fp32)."""
        if self.device.type == "cuda" and self.precision != "fp32":
            import torch

            return torch.autocast("cuda", dtype=_dtype(self.precision))
        return contextlib.nullcontext()

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on any device -> normalised float (N, 3, h, w) on the encoder's device."""
        from stamp.encoders.transforms import to_model_input

        return to_model_input(tiles, self.spec.input, self.device)

    def forward_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
        """Features of one batch as a float16 tensor on the encoder's device (no host copy)."""
        import torch

        with torch.inference_mode():
            if self.dim == 0:
                return torch.zeros((tiles.shape[0], 0), dtype=torch.float16, device=self.device)
            if self.model is None:
                raise RuntimeError(f"encoder {self.name!r} has no network to run")
            x = self.preprocess(tiles)
            with self.autocast():
                y = self.model(x)
            if y.shape[-1] != self.dim:
                raise RuntimeError(
                    f"encoder {self.name!r} produced {y.shape[-1]} features, declared {self.dim}"
                )
            return y.float().to(torch.float16)

    def iter_batches(self, tiles: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        import torch

        for i in range(0, len(tiles), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(tiles[i : i + batch_size]))
            if self.device.type == "cuda":
                chunk = chunk.pin_memory()
            yield chunk

    def encode(self, tiles: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Features of uint8 tiles (N, H, W, 3) as float16 (N, dim)."""
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"tiles must be uint8 with shape (N, H, W, 3), got {tiles.dtype} {tiles.shape}")
        if len(tiles) == 0 or self.dim == 0:  # `empty` needs no torch at all
            return np.zeros((len(tiles), self.dim), dtype=np.float16)
        bs = batch_size or self.preferred_batch_size
        out = [self.forward_uint8(b).cpu().numpy() for b in self.iter_batches(tiles, bs)]
        return np.concatenate(out, axis=0)

    __call__ = encode


def _weightless_digest(spec: EncoderSpec) -> str:
    """Digest of a weight-free encoder: its name and code version (stands in for a weights sha256)."""
    version = spec.timm_kwargs.get("feature_version", 1)
    return hashlib.sha256(f"weight-free:{spec.name}:v{version}".encode()).hexdigest()


def _checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")
    return precision


def encoder_weights_digest(
    name: str,
    *,
    weights_dir: str | os.PathLike[str] | None = None,
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    strict: bool = True,
    hf_cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """The ``weights_sha256`` that :func:`load_encoder` would give ``name``, without building it (no torch).

    Resolves and verifies the same files (raising the same errors for missing or mismatching weights),
    so a stage can key its cache and fail fast before any model is built.
    """
    spec = get_spec(name)
    locks = load_lock(lock)
    digests: dict[str, dict[str, str]] = {}
    for part in (*spec.components, spec.name):
        pspec = get_spec(part)
        if pspec.weights is None:
            continue
        files = resolve_weights(pspec, weights_dir, lock=locks, hf_cache_dir=hf_cache_dir)
        digests[part] = verify_files(pspec, files, lock=locks, strict=strict or get_family(part).remote_code)
    return combined_digest(digests) if digests else _weightless_digest(spec)


def load_encoder(
    name: str,
    *,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    lock: Lock | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    strict: bool = False,
    hf_cache_dir: str | os.PathLike[str] | None = None,
    precision: str | None = None,
) -> Encoder:
    """Build ``name``, load and verify its weights, and return it in eval mode on ``device``.

    Weights are looked up locally only (``weights_dir/<name>/``, then the HF cache at
    the pinned revision); a missing file raises
    :class:`~stamp.encoders.errors.WeightsNotFoundError` with the command that fetches
    it, a digest mismatch :class:`~stamp.encoders.errors.WeightsDigestError`.
    ``strict=True`` also refuses files the lock has no digest for (the pipeline always
    loads strictly). A family that runs code shipped with its weights
    (``Family.remote_code``) is always strict and loads from a private copy of the
    verified bytes (:func:`~stamp.encoders.weights.verified_private_copy`). ``precision``
    overrides the spec's autocast precision on CUDA (``"fp32"``: no autocast, STAMP's
    own setting, for bit-level parity with STAMP features).
    """
    spec = get_spec(name)
    locks = load_lock(lock)
    if spec.dim == 0 and not spec.components and spec.weights is None:  # `empty`: no network, no torch
        enc = Encoder(spec, None, device=str(device), weights_sha256=_weightless_digest(spec))
        if precision is not None:
            enc.precision = _checked_precision(precision)  # type: ignore[assignment]
        return enc
    import torch

    dev = torch.device(device)

    # resolve and verify everything before the (slow) build: fail fast on missing weights
    resolved: dict[str, dict[str, Path]] = {}
    digests: dict[str, dict[str, str]] = {}
    with contextlib.ExitStack() as copies:
        for part in (*spec.components, spec.name):
            pspec = get_spec(part)
            if pspec.weights is None:
                continue
            files = resolve_weights(pspec, weights_dir, lock=locks, hf_cache_dir=hf_cache_dir)
            if get_family(part).remote_code:  # runs code from its files: all pinned, loaded from a copy
                files, digests[part] = copies.enter_context(verified_private_copy(pspec, files, lock=locks))
            else:
                digests[part] = verify_files(pspec, files, lock=locks, strict=strict)
            resolved[part] = files
        model = _build_and_load(spec, dev, resolved, digests, locks)
    wdigest = combined_digest(digests) if resolved else _weightless_digest(spec)
    model.eval().requires_grad_(False)
    model.to(dev)
    enc = Encoder(spec, model, device=dev, weights_sha256=wdigest, file_digests=digests)
    if precision is not None:
        enc.precision = _checked_precision(precision)  # type: ignore[assignment]
    return enc


def _build_and_load(
    spec: EncoderSpec,
    dev: torch.device,
    resolved: Mapping[str, Mapping[str, Path]],
    digests: Mapping[str, Mapping[str, str]],
    locks: Lock,
) -> nn.Module:
    """The network with its verified weights loaded (family ``load``, or ``build`` + ``load_weights``)."""
    fam = get_family(spec.name)
    name = spec.name
    trusted = {
        str(resolved[p][fn]): sha
        for p in digests
        for fn, sha in digests[p].items()
        if locks[p].files.get(fn) == sha
    }
    paths = {
        f"{p}/{fn}" if p != spec.name else fn: path for p, fs in resolved.items() for fn, path in fs.items()
    }
    with _trusted_files(trusted):
        if fam.load is not None:  # vendor code builds the network from its own files
            model = fam.load(spec, paths)
        else:
            # build directly on the accelerator (random init of a 1B-parameter ViT is slow on CPU)
            with dev if dev.type == "cuda" else contextlib.nullcontext():
                model = fam.build(spec)
            if resolved:
                if fam.load_weights is None:
                    raise RuntimeError(f"encoder {name!r} declares weights but its family has no loader")
                fam.load_weights(model, paths, spec)
    return model


_TRUSTED: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "stamp_trusted_weights", default=MappingProxyType({})
)


@contextlib.contextmanager
def _trusted_files(paths: Mapping[str, str]) -> Iterator[None]:
    """Within this context :func:`read_trusted` knows which paths matched a locked digest (path -> sha256)."""
    token = _TRUSTED.set(MappingProxyType(dict(paths)))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def read_trusted(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`read_state_dict` for family loaders: full unpickle only if the file's digest was locked."""
    return read_state_dict(path, trusted_sha256=_TRUSTED.get().get(str(path)))
