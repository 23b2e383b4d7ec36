"""KV-cache operators: a C++/CUDA extension (cpp_ext/) and a pure-torch reference with the same API.

    ops = get_kv_ops("ext")      # or "torch" (--kv-impl torch): explicit, never a silent fallback
    ops.rope_write_block(cache_k, k, cos, sin, offset, ring_start, ring_size)
    ops.write_block(cache_v, v, offset, ring_start, ring_size)
    ops.rerotate(cache_k, cos_delta, sin_delta, start, length)

Conventions: caches [B, S, H, D] contiguous; blocks [B, N, H, D]; `offset` a [1] int64 tensor on the
cache's device holding the block's first LOGICAL slot (it may grow without bound when a ring is used);
cos/sin float32 [rows, D/2], already gathered per row (pairs that must not rotate carry cos=1, sin=0).
Only importing the "ext" implementation builds/loads the extension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KV_IMPLS = ("ext", "torch")


@dataclass(frozen=True)
class KVOps:
    """The three cache ops of one implementation; same signatures as hallolive_rt.kvcache.reference."""

    name: str
    write_block: Callable[..., None]
    rope_write_block: Callable[..., None]
    rerotate: Callable[..., None]


def get_kv_ops(impl: str = "ext") -> KVOps:
    """"ext": the compiled extension (built on first use, KVExtBuildError if that fails); "torch": reference."""
    if impl == "ext":
        from . import ops as mod
    elif impl == "torch":
        from . import reference as mod
    else:
        raise ValueError(f"kv impl must be one of {KV_IMPLS} (--kv-impl ext|torch), got {impl!r}")
    return KVOps(impl, mod.write_block, mod.rope_write_block, mod.rerotate)


__all__ = ["KV_IMPLS", "KVOps", "get_kv_ops"]
