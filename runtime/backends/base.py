"""The backend contract: how a streaming session runs one DiT step. A backend replaces
``BlockStream.eager_step`` and nothing else: ``prepare(stream, plans)`` once per session, then
``step(xv, xa, vt, at, plan) -> (flow_v, flow_a)``; in full: ``docs/ARCHITECTURE.md``, "Backends"."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from hallolive_rt.cache_policy import BlockPlan
from hallolive_rt.errors import BackendUnavailable

__all__ = ["Backend", "BackendUnavailable", "variant_name", "distinct_variants"]


def variant_name(variant: tuple[int, int]) -> str:
    audio_len, kv_len = variant
    return f"audio_len={audio_len},video_kv_len={kv_len}"


def distinct_variants(plans: list[BlockPlan]) -> list[tuple[int, int]]:
    """Distinct static variants, largest first (the order graphs are captured in: the largest sizes
    the shared memory pool, the smaller ones reuse it)."""
    return sorted({p.variant for p in plans}, key=lambda v: (v[1], v[0]), reverse=True)


class Backend(ABC):
    """One way to execute the DiT step. Subclasses set ``name``."""

    name: str = "?"

    @abstractmethod
    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        """Build whatever the backend needs for every variant of ``plans`` (``stream`` is a BlockStream)."""

    @abstractmethod
    def step(self, xv: torch.Tensor, xa: torch.Tensor, vt: torch.Tensor, at: torch.Tensor,
             plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """One DiT forward; same arguments and results as ``BlockStream.eager_step``."""

    @abstractmethod
    def variants(self) -> list[str]:
        """Printable list of the static variants this backend has prepared."""

    def describe(self) -> str:
        v = self.variants()
        return f"{self.name}: {len(v)} variant(s)" + "".join(f"\n  {x}" for x in v)
