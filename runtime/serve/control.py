"""What a client's control messages do, whatever carries them (a WebSocket in ``app.py``, a WebRTC data
channel in ``webrtc.py``): ``Control.receive`` validates one message (``protocol.parse_message``), counts
the bad ones, and starts, switches, acknowledges or stops the connection's ``LiveSession``."""

from __future__ import annotations

import asyncio
import contextlib

from .protocol import (CLOSE_BAD_MESSAGES, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TIMEOUT, Ack, Prompt, ProtocolError,
                       Start, Stop, event, parse_message)
from .sessions import Close, LiveServer, LiveSession

SHUTDOWN_MESSAGE = "the server is shutting down: connect again later"
_COUNTS = ("replica", "replicas", "active_sessions", "max_sessions")


def shutdown_event() -> dict:
    return event("error", code="server_shutdown", message=SHUTDOWN_MESSAGE, fatal=True)


def busy_event(server: LiveServer, say_where: bool = False) -> dict:
    st = server.stats()
    n = st["replicas"]
    where = (" of this server" if n == 1 else f" of each of the {n} replicas") if say_where else ""
    return event("busy", **{k: st[k] for k in _COUNTS},
                 message=f"all {st['max_sessions']} session slot(s){where} are in use: try again later")


class Control:
    """One connection's control half. The transport sets ``emit`` (thread-safe: events, Binary, Close; e.g.
    ``_queue``, onto ``out`` on ``loop``) and ``media`` / ``transport`` for the session it opens."""

    transport = "ws"
    media = None

    def __init__(self, server: LiveServer, slot):
        self.server, self.slot, self.limits = server, slot, server.limits
        self.session: LiveSession | None = None
        self.closing = False
        self.bad = 0
        self.emit = lambda item: None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.finished = asyncio.Event()

    def _queue(self, item) -> None:  # any thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the connection ended
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def hello(self, **extra) -> dict:
        st = self.server.stats()
        return event("hello", server="hallolive-rt", **{k: st[k] for k in _COUNTS}, profile=self.server.info(),
                     limits=self.limits.as_dict(), **extra)

    def start_timed_out(self) -> None:
        self.emit(event("error", code="start_timeout", fatal=True,
                        message=f"no start message within {self.limits.start_timeout_s:g} s"))
        self.close_after(CLOSE_TIMEOUT, "start_timeout")

    async def release(self, reason: str) -> None:
        """The connection is over: its slot back, or its session aborted and waited for (it frees the slot as
        its thread ends; not waited for once the server shuts down); then detached and ``finished``."""
        if self.session is None:
            self.server.release(self.slot)
        else:
            self.session.abort(reason)
            while not self.session.join(timeout=0) and not self.server.shutting_down:
                await asyncio.sleep(0.02)
        self.server.detach(self)
        self.finished.set()

    def close_after(self, code: int, reason: str) -> None:
        """The connection closes once everything queued before this went out."""
        if not self.closing:
            self.closing = True
            self.emit(Close(code, reason))

    def receive(self, raw: str | bytes) -> None:
        if self.closing:
            return  # the close is on its way: nothing more is read
        try:
            self._dispatch(parse_message(raw, self.limits))
        except ProtocolError as e:
            self.bad += 1
            fatal = e.fatal or self.bad >= self.limits.max_bad_messages
            self.emit(event("error", code=e.code, message=str(e), fatal=fatal))
            if fatal:
                self.close_after(e.close if e.fatal else CLOSE_BAD_MESSAGES, e.code)

    def _dispatch(self, m) -> None:
        s = self.session
        if isinstance(m, Start):
            if s is not None:
                raise ProtocolError("already_started", "this connection already runs a session: one per connection")
            if self.server.shutting_down:
                raise ProtocolError("server_shutdown", SHUTDOWN_MESSAGE, fatal=True, close=CLOSE_GOING_AWAY)
            self.server.check_prompt(m.prompt)
            self.session = self.server.open_session(self.slot, m, self.emit, media=self.media,
                                                    transport=self.transport)
        elif s is None and isinstance(m, (Prompt, Ack)):
            raise ProtocolError("not_started", "send a 'start' message first")
        elif isinstance(m, Prompt):
            s.switch_prompt(m.prompt)
        elif isinstance(m, Ack):
            s.ack(m.block)
        elif isinstance(m, Stop):
            if s is None:
                self.close_after(CLOSE_NORMAL, "stopped")
            else:
                s.stop()
