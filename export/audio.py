"""Audio exporter: the MMAudio VAE decoder + BigVGAN as one graph per window length, exporting
``StreamingAudioDecoder.decode_window(window [B, W, C]) -> wav [B, W * samples_per_token]``; window assembly and
sample slicing stay in Python."""

from __future__ import annotations

import torch
from torch import nn

from hallolive_rt.model.vae_audio import AudioVAEDecoder
from hallolive_rt.model.vocoder import BigVGANVocoder

__all__ = ["AudioWindowModule"]


class AudioWindowModule(nn.Module):
    def __init__(self, vae: AudioVAEDecoder, vocoder: BigVGANVocoder):
        super().__init__()
        self.vae, self.vocoder = vae, vocoder

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        mel = self.vae(window.transpose(1, 2))  # [B, 80, 2W]
        return self.vocoder(mel)[:, 0]  # [B, W * spt]
