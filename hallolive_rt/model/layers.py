"""Layers of one DiT stream, named exactly like the checkpoint (``blocks.N.self_attn.q`` ...).
Numerics follow the release: RMSNorm in float32 then cast back and times weight; LayerNorm output cast
to the input dtype; modulation in the activation dtype; GELU(tanh) FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import FusableProjections

__all__ = ["RMSNorm", "LayerNorm", "SelfAttention", "CrossAttention", "FusionLayer", "Head", "ConvMLP",
           "ChannelLastConv1d", "Modulation"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class SelfAttention(FusableProjections):
    """Projections of the causal self-attention (the attention runs in ``dual_layer``); fusable group
    ``qkv`` = q, k, v, all on the layer's modulated input."""

    FUSED_GROUPS = {"qkv": ("q", "k", "v")}

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # each [B, L, C] -> [B, L, H, D]
        return tuple(x.view(x.shape[0], x.shape[1], self.num_heads, -1) for x in xs)

    def qkv(self, x: torch.Tensor):
        """x [B, L, C] -> q, k, v [B, L, H, D] (q, k RMS-normed over all C before the head split)."""
        q, k, v = self.project("qkv", x)
        return self._heads(self.norm_q(q), self.norm_k(k), v)


class CrossAttention(SelfAttention):
    """Text attention + fusion attention over the other stream, sharing one q and one o projection.
    Fusable groups: ``kv`` = k, v on the embedded text (``text_kv``, once per prompt) and ``kv_fusion`` =
    k_fusion, v_fusion on the other stream (``fusion_kv``, every forward); q stays apart."""

    FUSED_GROUPS = {"kv": ("k", "v"), "kv_fusion": ("k_fusion", "v_fusion")}

    def __init__(self, dim: int, other_dim: int, num_heads: int, eps: float):
        super().__init__(dim, num_heads, eps)
        self.k_fusion = nn.Linear(other_dim, dim)
        self.v_fusion = nn.Linear(other_dim, dim)
        self.pre_attn_norm_fusion = LayerNorm(other_dim, 1e-6, elementwise_affine=True)
        self.norm_k_fusion = RMSNorm(dim, 1e-6)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.norm_q(self.q(x)))[0]

    def text_kv(self, ctx: torch.Tensor):
        """ctx [B, T, C] (already text-embedded) -> k, v [B, T, H, D]; cached once per prompt."""
        k, v = self.project("kv", ctx)
        return self._heads(self.norm_k(k), v)

    def fusion_kv(self, other: torch.Tensor):
        """other stream [B, L', C'] -> k, v [B, L', H, D] before RoPE."""
        k, v = self.project("kv_fusion", self.pre_attn_norm_fusion(other))
        return self._heads(self.norm_k_fusion(k), v)


class Modulation(nn.Module):
    def __init__(self, dim: int, num: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, num, dim) / dim**0.5)


class FusionLayer(nn.Module):
    """``blocks.N`` of one stream; the dual-stream forward lives in ``dit.py``."""

    def __init__(self, dim: int, other_dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, other_dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = Modulation(dim, 6)

    def mod(self, e0: torch.Tensor):
        """e0 [B, N, 6, C] -> six [B, N, 1, C] chunks: shift, scale, gate, shift, scale, gate."""
        return (self.modulation.modulation.unsqueeze(1) + e0).chunk(6, dim=2)


class Head(nn.Module):
    def __init__(self, dim: int, out: int, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, n_groups: int) -> torch.Tensor:
        """x [B, L, C], e [B, N, C] per group of L/N tokens -> [B, L, out]."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)  # [B, N, 1, C]
        xn = self.norm(x).unflatten(1, (n_groups, -1))
        return self.head(xn * (1 + scale) + shift).flatten(1, 2)


class ChannelLastConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, L, C']
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvMLP(nn.Module):
    """Gated conv MLP of the audio patch embedding: w2(silu(w1 x) * w3 x), kernel 7, no bias."""

    def __init__(self, dim: int, hidden: int, kernel: int = 7):
        super().__init__()
        pad = kernel // 2
        self.w1 = ChannelLastConv1d(dim, hidden, kernel, padding=pad, bias=False)
        self.w2 = ChannelLastConv1d(hidden, dim, kernel, padding=pad, bias=False)
        self.w3 = ChannelLastConv1d(dim, hidden, kernel, padding=pad, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
