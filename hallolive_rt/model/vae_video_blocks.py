"""Layers of the Wan2.2 video VAE decoder written against an explicit temporal history: every causal 3-D
conv pads only in space and takes its 2 past frames from a history object passed down the call (a static,
capturable one for streaming; one that copies the release's cache list as the reference). No branch on
tensor values; submodule names and order follow the release checkpoint, so ``Wan2.2_VAE.pth`` loads 1:1."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CACHE_T", "History", "CausalConv3d", "RMSNorm", "ResidualBlock", "AttentionBlock", "Resample", "DupUp3D",
           "UpResidualBlock", "Decoder3d"]

CACHE_T = 2  # past frames each temporal-kernel-3 conv needs (= k_t - 1), the release's CACHE_T


class History(Protocol):
    """What a layer asks of the temporal state. ``first`` is a static Python bool."""

    first: bool

    def causal_input(self, conv: "CausalConv3d", x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, C, T, h, w] with CACHE_T past frames prepended ([B, C, T + 2, h, w]); records ``x``."""
        ...

    def skip_time_conv(self, conv: "CausalConv3d") -> bool:
        """The release's first-chunk rule for a temporal upsampler: True leaves frames undoubled."""
        ...


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only in space; the caller supplies the causal past (see ``History``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], spatial_pad: int):
        super().__init__(in_dim, out_dim, kernel, padding=(0, spatial_pad, spatial_pad))
        assert kernel[0] == CACHE_T + 1, "every cached conv of this decoder has temporal kernel 3"
        # Set by Decoder3d: slot in VideoDecodeState.history and spatial scale of its input.
        self.cache_index = -1
        self.cache_scale = 1


class RMSNorm(nn.Module):
    """Channel RMS norm with a learned gain: F.normalize(x, dim=1) * sqrt(C) * gamma (no bias)."""

    def __init__(self, dim: int, images: bool):
        super().__init__()
        # The stored gamma is (C, 1, 1, 1) for video tensors and (C, 1, 1) for per-frame images.
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Index-aligned with the checkpoint: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, (3, 3, 3), 1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, (3, 3, 3), 1),
        )
        # A 1x1x1 conv needs no past, so it stays a plain Conv3d (and holds no history slot).
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, hist: History) -> torch.Tensor:  # [B, C, T, h, w]
        r = self.residual
        y = F.silu(r[0](x))
        y = r[2](hist.causal_input(r[2], y))
        y = F.silu(r[3](y))
        y = r[6](hist.causal_input(r[6], y))
        return y + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, h, w]
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [BT, 1, hw, 3C]
        q, k, v = qkv.chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, hw, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x nearest spatial upsampling + 3x3 conv; with ``temporal`` a causal conv first doubles T."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # Slot 0 is the parameter-free upsampler of the release; the conv weight is 2-D, (C, C, 3, 3).
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), 0) if temporal else None

    def forward(self, x: torch.Tensor, hist: History) -> torch.Tensor:  # [B, C, T, h, w]
        if self.time_conv is not None and not hist.skip_time_conv(self.time_conv):
            b, c, t, h, w = x.shape
            y = self.time_conv(hist.causal_input(self.time_conv, x))  # [B, 2C, T, h, w]
            # Channel half p is output frame 2t + p: interleave the two halves in time.
            x = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        # Per-frame 2-D ops as 5-D ops with a unit time kernel: same numbers, no (b t) layout copies.
        # The release's 'nearest-exact' at a factor of 2 reads source pixel floor((i + 0.5) / 2) = floor(i / 2),
        # which is what 'nearest' reads: same numbers (a test holds them equal), and 'nearest' stays one
        # core ATen op that exporters map to ONNX Resize (nearest-exact is decomposed into index gathers)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        conv = self.resample[1]
        return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))


class DupUp3D(nn.Module):
    """Parameter-free shortcut: duplicate channels into a (factor_t, factor_s, factor_s) neighbourhood."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        assert out_dim * factor % in_dim == 0
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:  # [B, Cin, T, h, w]
        b, _, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        y = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        y = y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        # The first chunk's main path does not double time (skip_time_conv): keep the last copy only.
        return y[:, :, ft - 1:] if first else y


class UpResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, mult: int, temporal_up: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal_up else 1, 2) if up else None
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(mult)]
        if up:
            blocks.append(Resample(out_dim, temporal=temporal_up))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, hist: History) -> torch.Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, hist)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, hist.first)


class Decoder3d(nn.Module):
    """conv1 -> middle (res, attention, res) -> len(dim_mult) up blocks -> head (norm, SiLU, conv)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temperal_upsample: tuple[bool, ...], out_channels: int):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], (3, 3, 3), 1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        ups, scale = [], 1
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != len(dim_mult) - 1
            t_up = temperal_upsample[i] if i < len(temperal_upsample) else False
            ups.append(UpResidualBlock(cin, cout, num_res_blocks + 1, t_up, up))
            for m in ups[-1].modules():  # each cached conv at its input's spatial scale
                if isinstance(m, CausalConv3d):
                    m.cache_scale = scale
            scale *= 2 if up else 1
        self.upsamples = nn.Sequential(*ups)
        self.head = nn.Sequential(RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  CausalConv3d(dims[-1], out_channels, (3, 3, 3), 1))
        self.head[2].cache_scale = scale
        # History slots in call order (= registration order); a plain tuple, so not re-registered.
        self.cached_convs: tuple[CausalConv3d, ...] = tuple(m for m in self.modules() if isinstance(m, CausalConv3d))
        for i, m in enumerate(self.cached_convs):
            m.cache_index = i

    def forward(self, x: torch.Tensor, hist: History) -> torch.Tensor:  # [B, z, 1, h, w] -> [B, 12, n, 8h, 8w]
        x = self.conv1(hist.causal_input(self.conv1, x))
        x = self.middle[0](x, hist)
        x = self.middle[1](x)
        x = self.middle[2](x, hist)
        for block in self.upsamples:
            x = block(x, hist)
        x = F.silu(self.head[0](x))
        return self.head[2](hist.causal_input(self.head[2], x))
