"""``demo``: a weight-free, deterministic, fast tile encoder for the demo and the tests.

NOT FOR RESEARCH USE. It has no learned weights: its 96 features are handcrafted
colour, stain and texture statistics, enough to tell dense dark nuclear clusters
(the synthetic planted biomarker) from pink stroma with scattered purple nuclei,
and cheap enough for several hundred 224 px tiles per second on 2 CPU cores.

Computed at half resolution (2x2 mean), vectorised over the batch:

* colour: RGB mean/std, 8-bin histogram per channel, saturation, blue/red balance;
* stains: optical density (OD) per channel, H&E colour deconvolution with fixed
  Ruifrok-Johnston vectors (haematoxylin, eosin, residual): mean/std and the fraction
  of pixels above several concentrations;
* nuclear density: fraction of dark / haematoxylin-rich pixels, their local density
  in 4x4 and 8x8 windows (how clustered they are), blob counts (local maxima of the
  smoothed haematoxylin map) at two scales;
* texture: Sobel gradient magnitude and Laplacian statistics at two scales.
"""

from __future__ import annotations

import functools

from stamp.encoders.registry import EncoderSpec, Family, InputSpec, register

FEATURE_VERSION = 1
DIM = 96

# Ruifrok & Johnston H&E(+residual) OD vectors (rows), normalised at build time
_STAINS = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))


@functools.cache
def _demo_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def frac_above(v: torch.Tensor, edges: tuple[float, ...]) -> list[torch.Tensor]:
        """Fraction of each map's pixels above each edge; v is (N, h, w)."""
        p = v.shape[-1] * v.shape[-2]
        return [(v > e).sum((-2, -1)).float() / p for e in edges]

    def max3(v: torch.Tensor) -> torch.Tensor:
        """3x3 maximum filter of (N, h, w), edges replicated (separable, by slicing)."""
        p = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
        row = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])
        return torch.maximum(torch.maximum(row[:, :-2], row[:, 1:-1]), row[:, 2:])

    def box3(v: torch.Tensor) -> torch.Tensor:
        """3x3 mean filter of (N, h, w), edges replicated."""
        p = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
        row = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
        return (row[:, :-2] + row[:, 1:-1] + row[:, 2:]) / 9.0

    def texture(g: torch.Tensor) -> list[torch.Tensor]:
        """Sobel magnitude and |Laplacian| statistics of (N, h, w), by slicing (no conv)."""
        sx = g[:, :, 2:] - g[:, :, :-2]
        gx = sx[:, :-2] + 2 * sx[:, 1:-1] + sx[:, 2:]
        sy = g[:, 2:] - g[:, :-2]
        gy = sy[:, :, :-2] + 2 * sy[:, :, 1:-1] + sy[:, :, 2:]
        mag = (gx * gx + gy * gy).sqrt()
        c = g[:, 1:-1, 1:-1]
        lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * c).abs()
        m = torch.stack([mag.mean((-2, -1)), lap.mean((-2, -1))], 1)
        m2 = torch.stack([(mag * mag).mean((-2, -1)), (lap * lap).mean((-2, -1))], 1)
        sd = (m2 - m * m).clamp_min(0).sqrt()
        return [m[:, 0], sd[:, 0], *frac_above(mag, (0.1, 0.3)), m[:, 1], sd[:, 1]]

    class DemoFeatures(nn.Module):
        """(N, 3, H, W) RGB in [0, 1] -> (N, 96) handcrafted features."""

        def __init__(self) -> None:
            super().__init__()
            m = torch.tensor(_STAINS, dtype=torch.float32)
            m = m / m.norm(dim=1, keepdim=True)
            self.register_buffer(
                "unmix", torch.linalg.inv(m), persistent=False
            )  # od @ unmix -> concentrations

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return self._features(x)
            # CPU: chunks on worker threads with one intra-op thread each. Many short ops
            # on a multi-threaded OpenMP pool stall badly on small VMs (measured 10-100x
            # slowdowns on 2 vCPUs); per-thread chunks are stable and use every core.
            return torch.cat(list(_pool().map(self._features, x.split(_CHUNK))), 0)

        def _features(self, x: torch.Tensor) -> torch.Tensor:
            x = F.avg_pool2d(x.float(), 2)  # (N, 3, h, w) at half resolution
            n, _, h, w = x.shape
            r, g, b = x.unbind(1)
            gray = 0.299 * r + 0.587 * g + 0.114 * b  # (N, h, w)
            od = -torch.log((x * 255.0 + 1.0) / 256.0)
            conc = torch.einsum("nchw,cs->nshw", od, self.unmix)  # haematoxylin, eosin, residual
            hema, eos = conc[:, 0], conc[:, 1]
            mx = x.amax(1)
            sat = (mx - x.amin(1)) / mx.clamp_min(1e-3)

            maps = torch.cat([x, sat.unsqueeze(1), od, conc], 1).flatten(2)  # (N, 10, P)
            m1 = maps.mean(-1)
            sd = ((maps * maps).mean(-1) - m1 * m1).clamp_min(0).sqrt()
            feats: list[torch.Tensor] = [*m1.unbind(1), *sd.unbind(1), (b - r).mean((-2, -1))]  # 21

            # 8-bin histogram per RGB channel, one scatter for the whole batch: 24
            idx = ((x * 8).long().clamp_(0, 7) + 8 * torch.arange(3, device=x.device).view(1, 3, 1, 1)).view(
                n, -1
            )
            counts = torch.zeros(n, 24, device=x.device).scatter_add_(
                1, idx, torch.ones(idx.shape, device=x.device)
            )
            feats += list((counts / (h * w)).unbind(1))

            feats += frac_above(hema, (0.2, 0.4, 0.6, 0.8, 1.0, 1.5))  # 6
            feats += frac_above(eos, (0.1, 0.2, 0.4, 0.6))  # 4
            tissue = frac_above(od.sum(1), (0.15,))[0]
            feats += [tissue, *frac_above(gray, (0.85,))]  # 2: tissue, white
            feats += [1.0 - f for f in frac_above(gray, (0.25, 0.35, 0.45, 0.55, 0.65))]  # 5: dark fractions

            dark = (hema > 0.6).float()  # nuclear mask proxy, (N, h, w)
            for k in (4, 8):  # clustering: local density of nuclear pixels, 2 x 6 = 12
                dens = F.avg_pool2d(dark.unsqueeze(1), k)[:, 0]
                dm = dens.mean((-2, -1))
                dsd = ((dens * dens).mean((-2, -1)) - dm * dm).clamp_min(0).sqrt()
                feats += [*frac_above(dens, (0.25, 0.5, 0.75)), dm, dsd, dens.amax((-2, -1))]
            hs = box3(hema)
            for scale in (1, 2):  # blob counts per 1000 px, 2 x 2 = 4
                if scale == 2:
                    hs = F.avg_pool2d(hs.unsqueeze(1), 2)[:, 0]
                peak = hs >= max3(hs)
                for t in (0.3, 0.6):
                    feats.append(
                        1000.0 * (peak & (hs > t)).sum((-2, -1)).float() / (hs.shape[-1] * hs.shape[-2])
                    )
            feats += texture(gray) + texture(F.avg_pool2d(gray.unsqueeze(1), 2)[:, 0])  # 12
            hd = hema.clamp(0, 3)
            hd = (hd[:, :, 1:] - hd[:, :, :-1]).abs()
            feats += [hd.mean((-2, -1)), hd.amax((-2, -1))]  # 2: haematoxylin texture
            hc = hema - m1[:, 7, None, None]
            ec = eos - m1[:, 8, None, None]
            corr = (hc * ec).mean((-2, -1)) / (sd[:, 7] * sd[:, 8]).clamp_min(1e-6)
            edge = (max3(dark) - dark).mean((-2, -1))
            n_dark = dark.sum((-2, -1))
            h_dark = (hema * dark).sum((-2, -1)) / n_dark.clamp_min(1.0)
            feats += [corr, edge, n_dark / (h * w) / tissue.clamp_min(1e-3), h_dark]  # 4
            out = torch.stack(feats, dim=1)
            assert out.shape[1] == DIM, out.shape
            return out

    return DemoFeatures


_CHUNK = 32


_POOLS: dict[int, object] = {}


def _pool():
    """A small thread pool (one per process: a forked child must not reuse its parent's)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    pid = os.getpid()
    if pid in _POOLS:
        return _POOLS[pid]

    def one_thread() -> None:
        torch.set_num_threads(1)

    def run(fn, *a):  # inference mode does not cross threads
        with torch.inference_mode():
            return fn(*a)

    ex = ThreadPoolExecutor(
        max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="demo-enc", initializer=one_thread
    )

    class _Pool:
        def map(self, fn, chunks):
            return [f.result() for f in [ex.submit(run, fn, c) for c in chunks]]

    _POOLS[pid] = _Pool()
    return _POOLS[pid]


def build(spec: EncoderSpec):
    return _demo_class()().eval()


register(
    EncoderSpec(
        name="demo",
        family="demo",
        builder="native",
        timm_kwargs={"feature_version": FEATURE_VERSION},
        dim=DIM,
        n_params=0,
        params_note="weight-free handcrafted features",
        input=InputSpec(224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), interpolation="bilinear"),
        tile_px=224,
        mpp=256 / 224,
        precision="fp32",
        weights=None,
        license="MIT (project code)",
        gated=False,
        research_use=False,
        notes="NOT FOR RESEARCH USE: handcrafted colour/stain/texture features for the demo and tests",
    ),
    Family(build=build),
)
