"""What a client's control messages do, whatever carries them (a WebSocket in ``app.py``, a WebRTC data
channel in ``webrtc.py``): ``Control.receive`` validates one message (``protocol.parse_message``), counts
the bad ones, and starts, switches, acknowledges or stops the connection's ``LiveSession``."""

from __future__ import annotations

from .protocol import (CLOSE_BAD_MESSAGES, CLOSE_GOING_AWAY, CLOSE_NORMAL, Ack, Prompt, ProtocolError, Start, Stop,
                       event, parse_message)
from .sessions import Close, LiveServer, LiveSession

SHUTDOWN_MESSAGE = "the server is shutting down: connect again later"


class Control:
    """One connection's control half. The transport sets ``emit`` (thread-safe: events, Binary, Close) and
    passes ``media`` / ``transport`` on to the session it opens."""

    transport = "ws"
    media = None

    def __init__(self, server: LiveServer, slot):
        self.server, self.slot, self.limits = server, slot, server.limits
        self.session: LiveSession | None = None
        self.closing = False
        self.bad = 0
        self.emit = lambda item: None

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
