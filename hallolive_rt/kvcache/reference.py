"""Pure-torch reference of the hallolive_kv ops, the tests' ground truth and the ``--kv-impl torch``
choice: the same signatures, slot indices from the offset tensor (no host read: capturable), ``index_copy_``
and RoPE as a separate fp32 pass (three passes over memory where the extension makes one). Block row n goes
to logical slot offset[0] + n; slots past ``ring_start`` wrap inside [ring_start, ring_start + ring_size)."""

from __future__ import annotations

import torch

from .checks import validate_rerotate, validate_rope_write_block, validate_write_block


def physical_slots(offset: torch.Tensor, n: int, ring_start: int, ring_size: int) -> torch.Tensor:
    """Physical cache slots of a block's N rows. offset: [1] int64 -> [N] int64 on offset's device."""
    logical = offset + torch.arange(n, device=offset.device, dtype=torch.int64)  # [N]
    if ring_size == 0:
        return logical
    wrapped = ring_start + torch.remainder(logical - ring_start, ring_size)
    return torch.where(logical >= ring_start, wrapped, logical)


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE in fp32, result in x's dtype. x: [B, N, H, D]; cos, sin: [N, D/2] float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, N, H, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # [N, 1, D/2]: one angle per (token, pair), shared by heads
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def write_block(cache: torch.Tensor, src: torch.Tensor, offset: torch.Tensor,
                ring_start: int = 0, ring_size: int = 0) -> None:
    """cache [B, S, H, D] <- src [B, N, H, D] at the block's physical slots, in place."""
    validate_write_block(cache, src, offset, ring_start, ring_size)
    cache.index_copy_(1, physical_slots(offset, src.shape[1], ring_start, ring_size), src)


def rope_write_block(cache: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     offset: torch.Tensor, ring_start: int = 0, ring_size: int = 0) -> None:
    """write_block(cache, RoPE(src, cos, sin), ...): cos, sin [N, D/2] float32, gathered per block row."""
    validate_rope_write_block(cache, src, cos, sin, offset, ring_start, ring_size)
    rotated = apply_rope_pairs(src, cos, sin)
    cache.index_copy_(1, physical_slots(offset, src.shape[1], ring_start, ring_size), rotated)


def rerotate(cache: torch.Tensor, cos_delta: torch.Tensor, sin_delta: torch.Tensor,
             start: int, length: int) -> None:
    """Rotate cached rows [start, start+length) by a per-row position delta ([length, D/2]) in place."""
    validate_rerotate(cache, cos_delta, sin_delta, start, length)
    rows = cache[:, start:start + length]  # [B, length, H, D] view
    rows.copy_(apply_rope_pairs(rows, cos_delta, sin_delta))
