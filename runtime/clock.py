"""One clock for a stream: marks on CUDA streams (events) or host timestamps (CPU), converted to seconds
since the stream's start, and the DiT's time on a block from its marks."""

from __future__ import annotations

import time

import torch

__all__ = ["Clock", "dit_ms"]


class Clock:
    """Marks on streams (CUDA events) or host timestamps (CPU), and their conversion to seconds."""

    def __init__(self, devices: list[torch.device]):
        self.cuda = devices[0].type == "cuda"
        self.devices = sorted({d for d in devices}, key=str)
        self.t0 = time.perf_counter()
        self._origin: dict[torch.device, torch.cuda.Event] = {}

    def start(self) -> None:
        """Time zero of a stream: synchronize, then one origin event per device."""
        if self.cuda:
            for d in self.devices:
                torch.cuda.synchronize(d)
        self.t0 = time.perf_counter()
        if self.cuda:
            for d in self.devices:
                with torch.cuda.device(d):
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    self._origin[d] = ev

    def mark(self):
        """A point on the current stream (the current device's)."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def now_s(self) -> float:
        return time.perf_counter() - self.t0

    def wait(self, m) -> None:
        if self.cuda:
            m.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def at_s(self, m, device: torch.device) -> float:
        """Seconds since ``start`` at which mark ``m`` (on ``device``) was reached (waits for it)."""
        if not self.cuda:
            return m - self.t0
        m.synchronize()
        return self._origin[device].elapsed_time(m) / 1e3


def dit_ms(clock: Clock, marks: dict) -> float:
    """The DiT's time on a block from its marks: ``dit_start`` -> ``dit_end``, less the hand-off between
    its denoising steps (``denoised``) and its context pass (``refresh_start``) where the session marks
    them (the sequential pipeline decodes the block inline there)."""
    if "denoised" in marks:
        return (clock.ms(marks["dit_start"], marks["denoised"])
                + clock.ms(marks["refresh_start"], marks["dit_end"]))
    return clock.ms(marks["dit_start"], marks["dit_end"])
