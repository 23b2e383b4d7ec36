"""Video VAE exporter: ``WanVideoDecoder.decode_frame(z, state, first)`` with the conv history explicit.

``first`` is static (two variants). Functional wrapper (ONNX/TensorRT): ``history_i`` in, ``history_i_out``
out, via the decoder's own ``decode_frame_functional``. In-place wrapper (AOTInductor): the history
buffers are written with ``copy_`` exactly as ``decode_frame`` does at runtime.
"""

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
