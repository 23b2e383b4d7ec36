"""When a live session goes wrong: the stage an exception came from (``failing_as`` tags it where it is
raised, on whichever thread; ``stage_of`` reads it back), the ``error`` event that tells the client, and the
``Watchdog``, one thread per ``LiveServer`` that ends a session making no progress for
``Limits.block_timeout_s`` (waits for the client do not count: flow control and ``client_timeout_s`` bound
those). A thread cannot be killed: a stalled session's client is told and closed at once, its slot comes
back when its thread returns, and until then ``/health`` counts it in ``stuck_sessions``."""

from __future__ import annotations

import logging
import threading
import time
import weakref

from ..decode_pipeline import failing_as
from .protocol import STAGES, event

__all__ = ["failing_as", "stage_of", "internal_error", "Watchdog"]

log = logging.getLogger("hallolive_rt.serve")

_MAX_MESSAGE = 500  # characters of an exception's text told to the client (the log has all of it)


def stage_of(e: BaseException, default: str) -> str:
    """The stage ``failing_as`` tagged on ``e`` (or on the exception it was raised from), else ``default``."""
    seen = 0
    while e is not None and seen < 8:
        stage = getattr(e, "failed_stage", None)
        if stage in STAGES:
            return stage
        e, seen = e.__cause__ or e.__context__, seen + 1
    return default


def internal_error(e: BaseException, stage: str) -> dict:
    """The client's ``error`` event for a session that ``e`` ended in ``stage``."""
    text = f"{type(e).__name__}: {e}"
    if len(text) > _MAX_MESSAGE:
        text = text[:_MAX_MESSAGE] + "..."
    return event("error", code="internal", stage=stage, fatal=True,
                 message=f"the session failed in {stage}: {text}; the server keeps serving: start a new session")


class Watchdog:
    """Checks the server's running sessions every ``tick`` (at most 0.5 s, a quarter of the timeout) and
    calls ``check_stall`` on each; holds the server weakly, so the thread ends with it."""

    def __init__(self, server):
        self._server = weakref.ref(server)
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="serve-watchdog", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        tick = 0.0
        while tick is not None and not self._wake.wait(tick):
            tick = self._check()

    def _check(self) -> float | None:
        """One round; the next wait, None once the server is gone (nothing is held between rounds)."""
        server = self._server()
        if server is None:
            return None
        try:
            for s in server.running():
                s.check_stall(time.monotonic())
        except Exception:  # noqa: BLE001 - the watchdog outlives any one session's failure
            log.exception("the session watchdog failed a check")
        return min(0.5, server.limits.block_timeout_s / 4)
