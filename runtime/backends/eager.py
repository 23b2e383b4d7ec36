"""The reference backend: PyTorch modules called eagerly, exactly ``BlockStream.eager_step``."""

from __future__ import annotations

from hallolive_rt.cache_policy import BlockPlan

from .base import Backend, distinct_variants, variant_name

__all__ = ["EagerBackend"]


class EagerBackend(Backend):
    name = "eager"

    def __init__(self):
        self._stream = None
        self._variants: list[tuple[int, int]] = []

    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        self._stream = stream
        self._variants = distinct_variants(plans)

    def step(self, xv, xa, vt, at, plan: BlockPlan):
        if self._stream is None:
            raise RuntimeError("EagerBackend.step before prepare()")
        return self._stream.eager_step(xv, xa, vt, at, plan)

    def variants(self) -> list[str]:
        return [variant_name(v) + " (eager, any shape)" for v in self._variants]
