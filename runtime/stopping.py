"""SIGINT / SIGTERM during ``hallolive-rt stream`` (``StopSignals``): before streaming a signal aborts at
once (``StreamInterrupted``, nothing written); while streaming the first one is a request, so the loop
ends on a block boundary with both tracks complete, and a second one aborts, leaving what the per-block
fragment flushes put on disk. Exit codes are 128 + signal: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals", "StreamInterrupted", "exit_code"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class StreamInterrupted(BaseException):
    """A signal that ends the stream now (BaseException, like KeyboardInterrupt: no ``except Exception``
    on the way may swallow it)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """SIGINT and SIGTERM handlers for the life of one stream (a no-op off the main thread)."""

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.graceful = False  # True while streaming: the first signal only sets ``requested``
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not (self.graceful and first):
            raise StreamInterrupted(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False
