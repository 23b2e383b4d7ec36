"""Text encoder exporter: ``TextEncoder.forward(ids, mask) -> ctx`` at the tokenizer's fixed length."""

from __future__ import annotations

import torch
from torch import nn

from hallolive_rt.model.text import TextEncoder

__all__ = ["TextModule"]


class TextModule(nn.Module):
    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids, mask)  # [B, L, dim]
