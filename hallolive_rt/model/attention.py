"""One attention facade for every attention in the DiT (self, text cross, fusion cross).

Inputs are [B, L, H, D] like the caches; no mask is ever needed at inference (causality comes from
what is in the caches). PyTorch's SDPA picks the best available kernel (flash / cuDNN / efficient
on CUDA, the math path on CPU); the explicit math reference below is what tests compare it with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_reference"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain float32 math version of ``attention`` (the slow path the fast one is tested against)."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v.float()).to(q.dtype)
