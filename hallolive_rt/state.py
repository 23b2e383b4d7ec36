"""Typed, preallocated runtime state of the DiT: KV caches ([L, B, S, H, D] per kind; slots ``[0, sink)``
kept, ``[sink, sink + ring)`` a ring, ``ring == 0`` plain append), text K/V, positions and write offsets.
Modules hold weights and constant tables only; a block step writes into these tensors at offsets held in
device tensors, so one captured graph serves every block of the same static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FusionConfig
from .profile import Profile

__all__ = ["CacheLayout", "DiTState", "StepPositions"]

_CACHES = ("video_k", "video_v", "fusion_k", "fusion_v", "text_k_video", "text_v_video", "text_k_audio",
           "text_v_audio")


@dataclass(frozen=True)
class CacheLayout:
    """Static geometry of the video caches (slots, sink, ring). Chosen by a cache policy."""

    slots: int  # S: cache rows per layer
    sink: int = 0  # rows before the ring that are never evicted
    ring: int = 0  # ring rows after the sink; 0 = append-only (released behaviour)

    def __post_init__(self):
        if self.ring and self.sink + self.ring != self.slots:
            raise ValueError(f"sink ({self.sink}) + ring ({self.ring}) must equal slots ({self.slots})")


@dataclass
class StepPositions:
    """Device-side positions of one DiT forward (inputs of a captured graph, never Python ints).

    video_frame_pos: [Fb] int64 RoPE frame index of each latent frame of the block.
    audio_pos:       [La] int64 RoPE position of each audio token of the forward's sequence.
    video_slot:      [1] int64 cache row where the block's first video token is written.
    """

    video_frame_pos: torch.Tensor
    audio_pos: torch.Tensor
    video_slot: torch.Tensor


@dataclass
class DiTState:
    """KV caches of one stream session. Shapes: caches [L, B, S, H, D]; text [L, B, T, H, D]."""

    layout: CacheLayout
    video_k: torch.Tensor  # video self-attention K (RoPE'd with video positions)
    video_v: torch.Tensor
    fusion_k: torch.Tensor  # video tokens as seen by the audio stream's fusion attention (RoPE'd)
    fusion_v: torch.Tensor
    text_k_video: torch.Tensor
    text_v_video: torch.Tensor
    text_k_audio: torch.Tensor
    text_v_audio: torch.Tensor

    @classmethod
    def allocate(cls, cfg: FusionConfig, profile: Profile, layout: CacheLayout, *,
                 device: torch.device | str, dtype: torch.dtype) -> "DiTState":
        s, t, v, a = layout.slots, profile.text.text_len, cfg.video, cfg.audio
        rows = dict(zip(_CACHES, [(s, v)] * 2 + [(s, a)] * 2 + [(t, v)] * 2 + [(t, a)] * 2))
        return cls(layout, **{k: torch.zeros(cfg.num_layers, profile.stream.batch, n, c.num_heads, c.head_dim,
                                             device=device, dtype=dtype) for k, (n, c) in rows.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _CACHES}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def reset(self) -> None:
        """Zero every cache in place (a new stream on the same buffers; no reallocation)."""
        for t in self.tensors().values():
            t.zero_()


@dataclass(frozen=True)
class DecoderState:
    """Static buffers of a streaming decoder (causal conv caches, frame memories) that its ``decode_frame``
    writes in place; shapes never change, so a CUDA graph may capture them."""

    buffers: tuple[torch.Tensor, ...]

    def reset(self) -> None:
        for buf in self.buffers:
            buf.zero_()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(b.shape) for b in self.buffers]

    def with_layout(self, memory_format: torch.memory_format):
        """The same buffers in ``memory_format`` (channels_last_3d means channels_last for 4-D buffers)."""
        def fmt(b):
            return torch.channels_last if b.dim() == 4 and memory_format == torch.channels_last_3d else memory_format
        return type(self)(tuple(b.contiguous(memory_format=fmt(b)) for b in self.buffers))
