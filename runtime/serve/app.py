"""The HTTP + WebSocket front of a ``LiveServer`` (FastAPI on uvicorn): the page, ``/health``, ``/ws``.

``create_app(server, token=...)`` builds the app; ``serve_connection(server, websocket, ...)`` is the whole
life of one WebSocket (checks, admission, the session, the cleanup), usable from any ASGI route, so a Ray
Serve replica wraps the same function over its own ``LiveServer``. The page is three files shipped as
package data, read once here: no request path ever reaches the file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Sequence
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from .protocol import (CLOSE_BAD_MESSAGES, CLOSE_BUSY, CLOSE_FORBIDDEN_ORIGIN, CLOSE_NORMAL, CLOSE_TIMEOUT,
                       CLOSE_UNAUTHORIZED, PROTOCOL_VERSION, Ack, Prompt, ProtocolError, Start, Stop, event,
                       parse_message)
from .sessions import Binary, Close, LiveServer, LiveSession

__all__ = ["create_app", "serve_connection", "PAGE_FILES"]

log = logging.getLogger("hallolive_rt.serve")

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
# the page loads only itself; media comes from MediaSource blob: URLs, data from this origin's WebSocket
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _read_page() -> dict[str, tuple[bytes, str]]:
    static = resources.files(__package__) / "static"
    return {route: ((static / name).read_bytes(), ctype) for route, (name, ctype) in PAGE_FILES.items()}


def create_app(server: LiveServer, *, token: str | None = None, allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The app of one process: ``GET /`` (the page), ``GET /health`` (``server.stats()``), ``WS /ws``."""
    app = FastAPI(title="hallolive-rt live sessions", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live = server
    page = _read_page()
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
               "Referrer-Policy": "no-referrer"}

    def static_route(route: str):
        body, ctype = page[route]

        async def get() -> Response:
            return Response(body, media_type=ctype, headers=headers)

        app.api_route(route, methods=["GET", "HEAD"], include_in_schema=False)(get)

    for route in page:
        static_route(route)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "protocol": PROTOCOL_VERSION, **server.stats()})

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await serve_connection(server, websocket, token=token, allowed_origins=allowed_origins)

    return app


def _token_ok(ws: WebSocket, token: str) -> bool:
    given = ws.query_params.get("token")
    auth = ws.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _origin_ok(ws: WebSocket, allowed: Sequence[str]) -> bool:
    """A browser page may connect only from this server's own origin (or one allowed by --allow-origin);
    clients that send no Origin (not a browser) pass: the token guards those."""
    origin = ws.headers.get("origin")
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == ws.headers.get("host", "").lower()


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason), timeout=2.0)


async def serve_connection(server: LiveServer, ws: WebSocket, *, token: str | None = None,
                           allowed_origins: Sequence[str] = ()) -> None:
    """One WebSocket from accept to close: origin and token, a slot or ``busy``, the session, cleanup."""
    await ws.accept()
    refusal = None
    if not _origin_ok(ws, allowed_origins):
        refusal = ("forbidden_origin", "pages of another origin may not connect", CLOSE_FORBIDDEN_ORIGIN)
    elif token is not None and not _token_ok(ws, token):
        refusal = ("unauthorized", "missing or wrong token (?token=... or Authorization: Bearer ...)",
                   CLOSE_UNAUTHORIZED)
    if refusal is not None:
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps(event("error", code=refusal[0], message=refusal[1], fatal=True)))
        await _close(ws, refusal[2], refusal[0])
        return
    slot = server.admit()
    if slot is None:
        st = server.stats()
        with contextlib.suppress(Exception):
            where = "this server" if st["replicas"] == 1 else f"each of the {st['replicas']} replicas"
            await ws.send_text(json.dumps(event(
                "busy", replica=st["replica"], replicas=st["replicas"], active_sessions=st["active_sessions"],
                max_sessions=st["max_sessions"], message=f"all {st['max_sessions']} session slot(s) of {where} "
                                                         f"are in use: try again later")))
        await _close(ws, CLOSE_BUSY, "busy")
        return
    conn = _Connection(server, ws, slot)
    try:
        await conn.run()
    finally:
        if conn.session is None:
            server.release(slot)
        else:  # the session releases its slot when its thread ends
            conn.session.abort("disconnected")
            while not conn.session.join(timeout=0):
                await asyncio.sleep(0.02)


class _Connection:
    """The two halves of one connection: a receiver (validates, dispatches) and a sender (events, bytes)."""

    def __init__(self, server: LiveServer, ws: WebSocket, slot):
        self.server, self.ws, self.slot, self.limits = server, ws, slot, server.limits
        self.session: LiveSession | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.closing = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        def emit(item) -> None:  # any thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: the connection ended
                loop.call_soon_threadsafe(self.out.put_nowait, item)

        self.emit = emit
        st = self.server.stats()
        emit(event("hello", server="hallolive-rt", replica=st["replica"], replicas=st["replicas"],
                   active_sessions=st["active_sessions"], max_sessions=st["max_sessions"], profile=self.server.info(),
                   limits=self.limits.as_dict()))
        tasks = {asyncio.create_task(self._send_loop()), asyncio.create_task(self._receive_loop())}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _close_after(self, code: int, reason: str) -> None:
        """The sender closes once everything queued before this went out."""
        if not self.closing:
            self.closing = True
            self.emit(Close(code, reason))

    async def _send_loop(self) -> None:
        timeout = self.limits.client_timeout_s
        while True:
            item = await self.out.get()
            if isinstance(item, Close):
                await _close(self.ws, item.code, item.reason)
                return
            try:
                if isinstance(item, Binary):
                    await asyncio.wait_for(self.ws.send_bytes(item.data), timeout)
                    if item.block is not None and self.session is not None:
                        self.session.sent(item.block)
                else:
                    await asyncio.wait_for(self.ws.send_text(json.dumps(item)), timeout)
            except asyncio.TimeoutError:
                log.info("a send did not complete in %.1f s: dropping the client", timeout)
                if self.session is not None:
                    self.session.abort("client_timeout")
                await _close(self.ws, CLOSE_TIMEOUT, "client_timeout")
                return
            except (WebSocketDisconnect, RuntimeError, OSError):
                return

    async def _receive_loop(self) -> None:
        bad = 0
        loop = asyncio.get_running_loop()
        start_deadline = loop.time() + self.limits.start_timeout_s
        while True:
            try:
                if self.session is None and not self.closing:
                    msg = await asyncio.wait_for(self.ws.receive(), max(0.0, start_deadline - loop.time()))
                else:
                    msg = await self.ws.receive()
            except asyncio.TimeoutError:
                self.emit(event("error", code="start_timeout", fatal=True,
                                message=f"no start message within {self.limits.start_timeout_s:g} s"))
                self._close_after(CLOSE_TIMEOUT, "start_timeout")
                continue
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            if self.closing:
                continue  # the close is on its way: nothing more is read
            raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes", b"")
            try:
                self._dispatch(parse_message(raw, self.limits))
            except ProtocolError as e:
                bad += 1
                fatal = e.fatal or bad >= self.limits.max_bad_messages
                self.emit(event("error", code=e.code, message=str(e), fatal=fatal))
                if fatal:
                    self._close_after(e.close if e.fatal else CLOSE_BAD_MESSAGES, e.code)

    def _dispatch(self, m) -> None:
        s = self.session
        if isinstance(m, Start):
            if s is not None:
                raise ProtocolError("already_started", "this connection already runs a session: one per connection")
            self.server.check_prompt(m.prompt)
            self.session = self.server.open_session(self.slot, m, self.emit)
        elif s is None and isinstance(m, (Prompt, Ack)):
            raise ProtocolError("not_started", "send a 'start' message first")
        elif isinstance(m, Prompt):
            s.switch_prompt(m.prompt)
        elif isinstance(m, Ack):
            s.ack(m.block)
        elif isinstance(m, Stop):
            if s is None:
                self._close_after(CLOSE_NORMAL, "stopped")
            else:
                s.stop()
