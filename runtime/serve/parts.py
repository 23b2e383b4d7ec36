"""The small pieces of live sessions: what a session hands its transport beside event dicts (``Binary``,
``Close``), what a server tells its observer (``ServerObserver``), a session slot, the server's counters,
and the cap on glibc's malloc arenas every serving process applies."""

from __future__ import annotations

import ctypes
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from ..metrics import percentile

__all__ = ["Binary", "Close", "ServerObserver", "Slot", "Stats", "cap_malloc_arenas"]


@dataclass(frozen=True)
class Binary:
    """fMP4 bytes for the client; ``block`` is set for a block's fragment (it counts for flow control)."""

    data: bytes
    block: int | None = None


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


@dataclass
class Slot:
    """One session's worth of the device: a StreamSession reused while the stream shape stays the same."""

    index: int
    session: object = None  # StreamSession
    key: tuple | None = None


@dataclass
class Stats:
    sessions_total: int = 0
    blocks_served: int = 0
    ended: Counter = field(default_factory=Counter)
    ttff_s: deque = field(default_factory=lambda: deque(maxlen=256))
    block_s: deque = field(default_factory=lambda: deque(maxlen=1024))
    first_out_s: dict = field(default_factory=dict)  # transport -> seconds from start to its first frame out

    def record_block(self, block_s: float, ttff_s: float | None) -> None:
        self.blocks_served += 1
        self.block_s.append(block_s)
        if ttff_s is not None:
            self.ttff_s.append(ttff_s)

    def record_first_out(self, transport: str, seconds: float) -> None:
        self.first_out_s.setdefault(transport, deque(maxlen=1024)).append(seconds)

    def summary(self) -> dict:
        """The counters as ``LiveServer.stats()`` reports them (percentiles of the latest values)."""
        def pct(xs) -> dict:
            xs = list(xs)
            return {"p50": percentile(xs, 50), "p95": percentile(xs, 95), "n": len(xs)}

        return {"sessions_total": self.sessions_total, "sessions_ended": dict(self.ended),
                "blocks_served": self.blocks_served, "ttff_s": pct(self.ttff_s), "block_s": pct(self.block_s),
                "first_frame_out_s": {k: pct(v) for k, v in self.first_out_s.items()}}


def cap_malloc_arenas(n: int = 4) -> bool:
    """``mallopt(M_ARENA_MAX)`` unless MALLOC_ARENA_MAX is set; whether it was applied (False off glibc). Each
    session's new threads get new arenas (up to 8 per core) that seldom return memory: RSS crept up with nothing
    leaked (2 cores, 40 tiny sessions: 426 -> 640 MiB uncapped; 444-531 MiB, no trend, capped at 4)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, n) == 1  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


class ServerObserver(Protocol):
    """What a LiveServer reports as it happens (a Ray replica exports it as metrics, ``ray.py``). Called on
    the thread where it happens (connection, session or writer thread), never under the server's lock."""

    def sessions(self, active: int) -> None: ...  # a slot was taken or freed: active sessions now
    def first_block(self, ttff_s: float) -> None: ...  # a session's first fragment went out
    def block(self, block_s: float) -> None: ...  # a block was served
    def ended(self, reason: str) -> None: ...  # a session ended (done, stopped, disconnected, error, ...)


class BlockPace:
    """A session's live numbers, block by block: the gap between first frames and the steady FPS (frames of
    blocks 1.. over the time they took to arrive, as ``metrics.py`` counts it)."""

    def __init__(self):
        self._prev_first: float | None = None
        self._done0: float | None = None
        self._steady_frames = 0

    def add(self, b) -> tuple[float | None, float | None]:
        """A decoded block arrived: its (gap_s, fps so far), None where not defined yet."""
        gap = None if self._prev_first is None else b.first_frame_s - self._prev_first
        self._prev_first, fps = b.first_frame_s, None
        if self._done0 is None:
            self._done0 = b.done_s
        else:
            self._steady_frames += b.frames.shape[0]
            fps = self._steady_frames / max(b.done_s - self._done0, 1e-9)
        return gap, fps
