"""The input transform, in torch, on a whole uint8 batch at once (no PIL per tile).

uint8 (N, H, W, 3) -> move to the device as uint8 (4x fewer bytes than float) ->
float in [0, 1] -> resize (antialiased when shrinking, like PIL) -> clamp -> centre
crop -> normalise. The result differs from STAMP's PIL pipeline only by resampling
round-off (PIL resizes in uint8); at STAMP's default 224 px tiles for 224 px models
the resize is the identity and the two agree exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stamp.encoders.registry import InputSpec


def _resize_size(h: int, w: int, spec: InputSpec) -> tuple[int, int]:
    assert spec.resize_px is not None
    r = spec.resize_px
    if spec.resize_mode == "square" or h == w:
        return r, r
    if h < w:  # torchvision Resize(int): shorter side to r, the other truncated
        return r, int(r * w / h)
    return int(r * h / w), r


def to_model_input(
    tiles: torch.Tensor, spec: InputSpec, device: torch.device | str | None = None
) -> torch.Tensor:
    """Turn a uint8 batch (N, H, W, 3) into the normalised float batch (N, 3, h, w) on ``device``."""
    if tiles.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8, got {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must have shape (N, H, W, 3), got {tuple(tiles.shape)}")
    dev = torch.device(device) if device is not None else tiles.device
    x = tiles.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    h, w = x.shape[-2:]
    if spec.resize_px is not None:
        size = _resize_size(h, w, spec)
        if size != (h, w):
            shrink = size[0] < h or size[1] < w
            x = F.interpolate(x, size=size, mode=spec.interpolation, align_corners=False, antialias=shrink)
            x = x.clamp_(0.0, 1.0)
            h, w = size
    if spec.crop_px is not None:
        c = spec.crop_px
        if h < c or w < c:  # torchvision pads with zeros before cropping
            x = F.pad(
                x,
                (
                    max(0, (c - w) // 2),
                    max(0, (c - w + 1) // 2),
                    max(0, (c - h) // 2),
                    max(0, (c - h + 1) // 2),
                ),
            )
            h, w = x.shape[-2:]
        top = int(round((h - c) / 2.0))
        left = int(round((w - c) / 2.0))
        x = x[..., top : top + c, left : left + c]
    if spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0):
        return x.contiguous()
    mean = torch.tensor(spec.mean, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()
