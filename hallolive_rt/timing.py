"""The one timing primitive of the runtime: a mark is a CUDA event recorded on the current stream (on a GPU)
or a ``time.perf_counter()`` reading (on CPU), and ``elapsed_ms`` is the time between two marks of one kind.
The stream's clock (``runtime/clock.py``) and the stage timer (``hallolive_rt/nvtx.py``) both take their
marks here, so a block time and a stage time measure the same thing."""

from __future__ import annotations

import time

import torch

__all__ = ["elapsed_ms", "mark"]


def mark(cuda: bool):
    """A point in time: an event on the current CUDA stream (no host sync) when ``cuda``, else perf_counter()."""
    if not cuda:
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def elapsed_ms(a, b) -> float:
    """Milliseconds from mark ``a`` to mark ``b``; for events, ``b`` must have been reached (sync first)."""
    if isinstance(a, float):
        return (b - a) * 1e3
    return a.elapsed_time(b)
