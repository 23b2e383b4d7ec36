"""Real-valued rotary position embedding, as the release computes it in complex128 but from float32
cos/sin tables (1024 positions per axis) gathered by integer position tensors: no complex dtype, no
float64, no data-dependent shape, so it exports and captures. Video (head_dim 128, 64 pairs) rotates with
frame, row and column; audio only its first 22 pairs, with frame frequencies x 0.2. The split:
``docs/ARCHITECTURE.md``, "RoPE".
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StreamConfig
from ..kvcache.reference import apply_rope_pairs as apply_rope  # one RoPE for the model and the cache ops

__all__ = ["RopeTables", "apply_rope", "ROPE_POSITIONS", "THETA"]

ROPE_POSITIONS = 1024  # table length of the release; the rolling cache policy re-bases to stay inside
THETA = 10000.0


def _table(pairs: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [P, pairs] of one axis, its angles computed in float64."""
    inv_freq = scale / torch.pow(THETA, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    ang = torch.outer(torch.arange(ROPE_POSITIONS, dtype=torch.float64), inv_freq)
    return ang.cos().float(), ang.sin().float()


class RopeTables(nn.Module):
    """Per-stream cos/sin tables (non-persistent buffers: not in the checkpoint, rebuilt after load)."""

    def __init__(self, cfg: StreamConfig):
        super().__init__()
        self.is_audio = cfg.is_audio
        self.half = cfg.head_dim // 2
        self.pairs = cfg.rope_pairs
        self.scale = cfg.temporal_rope_scaling_factor
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables on the current default device (call after a meta-device build)."""
        f, h, w = self.pairs
        axes = [("t", f, self.scale)] if self.is_audio else [("t", f, 1.0), ("h", h, 1.0), ("w", w, 1.0)]
        for name, n, scale in axes:
            c, s = _table(n, scale)
            self.register_buffer(f"cos_{name}", c, persistent=False)
            self.register_buffer(f"sin_{name}", s, persistent=False)

    def video(self, frame_pos: torch.Tensor, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [F*h*w, half] for tokens of frames at ``frame_pos`` [F] (int64), (f, h, w) row-major."""
        nf, dev = frame_pos.shape[0], frame_pos.device
        axes = {"t": (frame_pos, (nf, 1, 1, -1)), "h": (torch.arange(grid_h, device=dev), (1, grid_h, 1, -1)),
                "w": (torch.arange(grid_w, device=dev), (1, 1, grid_w, -1))}  # axis -> (positions, view)

        def table(kind: str) -> torch.Tensor:  # the t, h, w angles of each token side by side
            parts = [getattr(self, f"{kind}_{a}")[idx].view(view).expand(nf, grid_h, grid_w, -1)
                     for a, (idx, view) in axes.items()]
            return torch.cat(parts, dim=-1).reshape(nf * grid_h * grid_w, self.half)

        return table("cos"), table("sin")

    def audio(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [L, half] for audio tokens at ``pos`` [L]; pairs past the first ``pairs[0]`` untouched."""
        n = pos.shape[0]
        rest = self.half - self.cos_t.shape[1]
        cos = torch.cat([self.cos_t[pos], self.cos_t.new_ones(n, rest)], dim=-1)
        sin = torch.cat([self.sin_t[pos], self.sin_t.new_zeros(n, rest)], dim=-1)
        return cos, sin

    def frame_shift(self, frames: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [rows, half] rotating video keys by ``frames`` latent frames (negative = back; |frames| <
        1024); only the frame pairs turn. Used outside captured steps (rare re-basing)."""
        n = abs(frames)
        sign = 1.0 if frames >= 0 else -1.0
        ct, st = self.cos_t[n], self.sin_t[n] * sign
        ones = ct.new_ones(self.half - ct.shape[0])
        cos = torch.cat([ct, ones]).expand(rows, -1).contiguous()
        sin = torch.cat([st, torch.zeros_like(ones)]).expand(rows, -1).contiguous()
        return cos, sin
