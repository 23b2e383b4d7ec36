"""One attention facade for every attention in the DiT (self, text cross, fusion cross): q, k, v
[B, L, H, D] like the caches, never a mask (causality is what the caches hold). ``attention`` is PyTorch's
SDPA with a kernel choice (``auto`` | ``math`` | ``flash`` | ``cudnn`` | ``efficient``; a non-auto choice
allows that kernel only and is probed first by ``check_attention_kernel``); ``attention_reference`` is the
float32 math every kernel is tested against. The choices: ``docs/ARCHITECTURE.md``, "Attention kernels".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["ATTENTION_KERNELS", "attention", "attention_kernel", "attention_reference", "check_attention_kernel"]

_BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
ATTENTION_KERNELS = ("auto", *_BACKENDS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_kernel(kernel: str):
    """Context manager restricting ``attention`` to ``kernel`` (a no-op for ``auto``)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}")
    return contextlib.nullcontext() if kernel == "auto" else sdpa_kernel(_BACKENDS[kernel])


def check_attention_kernel(kernel: str, device: torch.device | str, dtype: torch.dtype,
                           head_dims: Iterable[int]) -> None:
    """Raise ``ValueError`` unless ``kernel`` runs ``attention`` on ``device`` in ``dtype`` for every head dim
    (probed host-side with small calls; on the meta device any valid name passes)."""
    device = torch.device(device)
    with attention_kernel(kernel):  # validates the name
        if kernel == "auto" or device.type == "meta":
            return
        for d in sorted(set(head_dims)):
            q = torch.zeros(1, 16, 2, d, device=device, dtype=dtype)
            kv = torch.zeros(1, 24, 2, d, device=device, dtype=dtype)
            with warnings.catch_warnings(record=True) as why:
                warnings.simplefilter("always")
                try:
                    attention(q, kv, kv)
                    attention(q, q, q)
                except RuntimeError as e:
                    reasons = "; ".join(dict.fromkeys(str(w.message).strip() for w in why)) or str(e).strip()
                    raise ValueError(f"attention kernel {kernel!r} cannot run on {device} with {dtype} and head "
                                     f"dim {d} (torch says: {reasons.rstrip('.')}). Choose another --attn-kernel "
                                     f"(auto lets PyTorch pick).") from e


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain float32 math version of ``attention`` (the slow path the fast one is tested against)."""
    scale = q.shape[-1] ** -0.5
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(dim=-1), v.float()).to(q.dtype)
