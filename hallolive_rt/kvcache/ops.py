"""The hallolive_kv extension ops (``write_block``, ``rope_write_block``, ``rerotate``; schemas in
``cpp_ext/registration.cpp``): Python wrappers and the fake (meta) kernels ``torch.compile`` needs.
Importing it loads ``cpp_ext/``'s library (built on first use, ``build.py``); the semantics are
``kvcache/reference.py``'s."""

from __future__ import annotations

import torch

from . import build
from .checks import validate_rerotate, validate_rope_write_block, validate_write_block

build.load_library()
_ops = torch.ops.hallolive_kv


# Fakes: the ops return nothing and only mutate `cache`, so a fake only has to refuse what the real
# kernel would refuse, from metadata alone.
@torch.library.register_fake("hallolive_kv::write_block")
def _write_block_fake(cache, src, offset, ring_start, ring_size):
    validate_write_block(cache, src, offset, ring_start, ring_size)


@torch.library.register_fake("hallolive_kv::rope_write_block")
def _rope_write_block_fake(cache, src, cos, sin, offset, ring_start, ring_size):
    validate_rope_write_block(cache, src, cos, sin, offset, ring_start, ring_size)


@torch.library.register_fake("hallolive_kv::rerotate")
def _rerotate_fake(cache, cos_delta, sin_delta, start, length):
    validate_rerotate(cache, cos_delta, sin_delta, start, length)


def write_block(cache: torch.Tensor, src: torch.Tensor, offset: torch.Tensor,
                ring_start: int = 0, ring_size: int = 0) -> None:
    """cache [B, S, H, D] <- src [B, N, H, D] at logical slots offset[0] + n (offset: [1] int64, on cache's
    device), wrapping inside [ring_start, ring_start + ring_size) when ring_size > 0."""
    _ops.write_block(cache, src, offset, ring_start, ring_size)


def rope_write_block(cache: torch.Tensor, src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     offset: torch.Tensor, ring_start: int = 0, ring_size: int = 0) -> None:
    """write_block of RoPE(src) in one pass; cos, sin: [N, D/2] float32 per block row, fp32 math."""
    _ops.rope_write_block(cache, src, cos, sin, offset, ring_start, ring_size)


def rerotate(cache: torch.Tensor, cos_delta: torch.Tensor, sin_delta: torch.Tensor,
             start: int, length: int) -> None:
    """Rotate cached rows [start, start+length) in place by per-row deltas (cos/sin: [length, D/2])."""
    _ops.rerotate(cache, cos_delta, sin_delta, start, length)


def has_cuda_kernels() -> bool:
    """Whether the loaded library was built with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("hallolive_kv::write_block", "CUDA")
