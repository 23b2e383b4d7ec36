"""Video VAE exporter: ``WanVideoDecoder.decode_frame(z, state, first)`` with the conv history explicit and
``first`` static (two variants): a functional wrapper (``history_i`` in, ``history_i_out`` out) for ONNX/TensorRT
and an in-place wrapper (history written with ``copy_``) for AOTInductor."""

from __future__ import annotations

import torch
from torch import nn

from hallolive_rt.model.vae_video import VideoDecodeState, WanVideoDecoder

from .contracts import Variant

__all__ = ["VaeFrameModule", "vae_module_for"]


class VaeFrameModule(nn.Module):
    def __init__(self, decoder: WanVideoDecoder, first: bool, *, functional: bool):
        super().__init__()
        self.decoder, self.first, self.functional = decoder, first, functional

    def forward(self, z: torch.Tensor, *history: torch.Tensor):
        # z [B, z_dim, 1, h, w]; history_i [B, C_i, 2, h_i, w_i]
        if self.functional:
            frames, new = self.decoder.decode_frame_functional(z, tuple(history), self.first)
            return (frames, *new)
        return self.decoder.decode_frame(z, VideoDecodeState(tuple(history)), self.first)


def vae_module_for(decoder: WanVideoDecoder, variant: Variant, *, functional: bool) -> VaeFrameModule:
    return VaeFrameModule(decoder, bool(variant.static["first"]), functional=functional).eval()
