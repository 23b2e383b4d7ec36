"""KV-cache operators, a C++/CUDA extension (``cpp_ext/``) and a pure-torch reference with one API:
``get_kv_ops("ext" | "torch")`` -> ``rope_write_block``, ``write_block``, ``rerotate`` on caches
[B, S, H, D] and blocks [B, N, H, D], with ``offset`` a [1] int64 device tensor (the block's first logical
slot) and cos/sin float32 [rows, D/2] gathered per row. Explicit, never a silent fall-back; only "ext"
builds the extension. Conventions: ``docs/ARCHITECTURE.md``, "KV extension"."""

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
