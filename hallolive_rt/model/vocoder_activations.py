"""BigVGAN's anti-aliased periodic activation: 2x upsample -> Snake/SnakeBeta -> 2x downsample, on [B, C, T],
so the harmonics the nonlinearity creates do not alias back into the band. Names follow the checkpoint
(``act.alpha``, ``act.beta``, and the Kaiser-sinc taps ``upsample.filter`` / ``downsample.lowpass.filter``
[1, 1, 12], which ``kaiser_sinc_filter`` recomputes for a randomly built model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["kaiser_sinc_filter", "SnakeBeta", "Snake", "UpSample1d", "DownSample1d", "AntiAliasedActivation"]

_SNAKE_EPS = 1e-9  # guards 1/beta; same constant as the release


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Low-pass FIR taps [1, 1, kernel_size]: sinc at ``cutoff`` (cycles/sample) under a Kaiser window
    whose beta follows Kaiser's empirical rule for a transition band of ``half_width``; sums to 1."""
    half = kernel_size // 2
    atten = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # stop-band attenuation in dB
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21.0) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:  # taps sit between samples, symmetric about 0
        t = torch.arange(-half, half, dtype=torch.float32) + 0.5
    else:
        t = torch.arange(kernel_size, dtype=torch.float32) - half
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
    return (taps / taps.sum()).view(1, 1, kernel_size)


class SnakeBeta(nn.Module):
    """x + sin^2(a x) / b per channel, with a = exp(alpha), b = exp(beta) when ``logscale``."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        a, b = self.alpha.view(1, -1, 1), self.beta.view(1, -1, 1)
        if self.logscale:
            a, b = a.exp(), b.exp()
        return x + torch.sin(x * a).pow(2) / (b + _SNAKE_EPS)


class Snake(nn.Module):
    """x + sin^2(a x) / a (the one-parameter variant, kept for configs with activation='snake')."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        a = self.alpha.view(1, -1, 1)
        if self.logscale:
            a = a.exp()
        return x + torch.sin(x * a).pow(2) / (a + _SNAKE_EPS)


class UpSample1d(nn.Module):
    """Zero-stuffing 2x upsample + low-pass, edges extended by replication: [B, C, T] -> [B, C, 2T]."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1  # input samples replicated at each edge
        # The transposed conv spreads each padded input over kernel_size outputs; these crops keep
        # exactly ratio * T outputs aligned with the unpadded input.
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        w = self.filter.to(x.dtype).expand(c, -1, -1)
        y = F.conv_transpose1d(x, w, stride=self.ratio, groups=c) * self.ratio
        return y[..., self.crop_left: y.shape[-1] - self.crop_right]


class _LowPass(nn.Module):
    """Replicate-padded strided low-pass; a separate module only to keep the checkpoint's name."""

    def __init__(self, ratio: int, kernel_size: int):
        super().__init__()
        self.stride = ratio
        self.pad_left = kernel_size // 2 - (1 if kernel_size % 2 == 0 else 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.to(x.dtype).expand(c, -1, -1), stride=self.stride, groups=c)


class DownSample1d(nn.Module):
    """Low-pass then keep every ``ratio``-th sample: [B, C, 2T] -> [B, C, T]."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = _LowPass(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class AntiAliasedActivation(nn.Module):
    """The release's ``Activation1d``: upsample -> periodic activation -> downsample, same length out."""

    def __init__(self, act: nn.Module, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.act = act
        self.upsample = UpSample1d(ratio, kernel_size)
        self.downsample = DownSample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        return self.downsample(self.act(self.upsample(x)))
