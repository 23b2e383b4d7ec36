"""One clock for a stream: marks on CUDA streams (events) or host timestamps (CPU), taken with
``hallolive_rt.timing`` (the primitive the stage timer uses too), converted to seconds since the stream's start."""

from __future__ import annotations

import torch

from hallolive_rt.timing import elapsed_ms, mark

__all__ = ["Clock"]


class Clock:
    """Marks on streams (CUDA events) or host timestamps (CPU), and their conversion to seconds."""

    def __init__(self, devices: list[torch.device]):
        self.cuda = devices[0].type == "cuda"
        self.devices = sorted({d for d in devices}, key=str)
        self.t0 = mark(False)
        self._origin: dict[torch.device, torch.cuda.Event] = {}

    def start(self) -> None:
        """Time zero of a stream: synchronize, then one origin event per device."""
        if self.cuda:
            for d in self.devices:
                torch.cuda.synchronize(d)
        self.t0 = mark(False)
        if self.cuda:
            for d in self.devices:
                with torch.cuda.device(d):
                    self._origin[d] = mark(True)

    def mark(self):
        """A point on the current stream (the current device's)."""
        return mark(self.cuda)

    def now_s(self) -> float:
        return elapsed_ms(self.t0, mark(False)) / 1e3

    def wait(self, m) -> None:
        if self.cuda:
            m.synchronize()

    def ms(self, a, b) -> float:
        return elapsed_ms(a, b)

    def at_s(self, m, device: torch.device) -> float:
        """Seconds since ``start`` at which mark ``m`` (on ``device``) was reached (waits for it)."""
        if not self.cuda:
            return elapsed_ms(self.t0, m) / 1e3
        m.synchronize()
        return elapsed_ms(self._origin[device], m) / 1e3
