"""The HTTP front of a ``LiveServer`` (FastAPI on uvicorn): the page (package data read once), ``/health``,
``/ws`` and, with WebRTC on, ``/webrtc/offer``; ``serve_connection`` is the whole life of one WebSocket,
for any ASGI route (a Ray replica wraps the same function), and SIGTERM / SIGINT end every connection
with ``server_shutdown`` and close 1001."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from importlib import resources
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from .control import SHUTDOWN_MESSAGE, Control, busy_event, shutdown_event
from .faults import internal_error
from .protocol import (CLOSE_BUSY, CLOSE_FORBIDDEN_ORIGIN, CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_TIMEOUT,
                       CLOSE_UNAUTHORIZED, PROTOCOL_VERSION, event)
from .sessions import Binary, Close, LiveServer

__all__ = ["create_app", "serve_connection", "shutdown_connections", "stop_on_signals", "leave_stuck_sessions",
           "PAGE_FILES", "SHUTDOWN_S"]

log = logging.getLogger("hallolive_rt.serve")

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
# the page loads only itself; media comes from MediaSource blob: URLs, data from this origin's WebSocket
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(server: LiveServer, *, token: str | None = None, allowed_origins: Sequence[str] = (),
               webrtc: bool = False, ice_servers: Sequence[str] = ()) -> FastAPI:
    """``webrtc`` adds ``POST /webrtc/offer`` (``webrtc.answer_offer``), under the same origin and token rules."""
    app = FastAPI(title="hallolive-rt live sessions", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.live = server
    static = resources.files(__package__) / "static"
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
               "Referrer-Policy": "no-referrer"}

    def static_route(route: str, body: bytes, ctype: str):
        async def get() -> Response:
            return Response(body, media_type=ctype, headers=headers)

        app.api_route(route, methods=["GET", "HEAD"], include_in_schema=False)(get)

    for route, (name, ctype) in PAGE_FILES.items():
        static_route(route, (static / name).read_bytes(), ctype)

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 while a session the watchdog ended is still stuck in its thread (its slot is not back): a
        # probe that restarts the process on it frees the device
        st = server.stats()
        ok = st["stuck_sessions"] == 0
        return JSONResponse({"status": "ok" if ok else "degraded", "protocol": PROTOCOL_VERSION, **st},
                            status_code=200 if ok else 503)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await serve_connection(server, websocket, token=token, allowed_origins=allowed_origins)

    # the page learns whether to offer the transport, and the STUN servers (never a TURN credential)
    stun = [s for s in ice_servers if s.startswith(("stun:", "stuns:"))]

    @app.get("/webrtc")
    async def webrtc_info() -> JSONResponse:
        return JSONResponse({"webrtc": webrtc, "ice_servers": stun}, headers=headers)

    if webrtc:
        from .webrtc import MAX_SDP_BYTES, answer_offer

        @app.post("/webrtc/offer")
        async def offer(request: Request) -> JSONResponse:
            refusal = _refusal(request, token, allowed_origins)
            if refusal is not None:
                return JSONResponse(event("error", code=refusal[0], message=refusal[1], fatal=True),
                                    status_code=403 if refusal[0] == "forbidden_origin" else 401, headers=headers)
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_SDP_BYTES:
                    return JSONResponse(event("error", code="too_large", fatal=True,
                                              message=f"an offer of more than {MAX_SDP_BYTES} bytes"),
                                        status_code=413, headers=headers)
            try:
                msg = json.loads(body)
            except ValueError as e:
                msg = f"not JSON: {e}"
            status, answer = await answer_offer(server, msg, ice_servers=ice_servers)
            return JSONResponse(answer, status_code=status, headers=headers)

    return app


def _refusal(conn, token: str | None, allowed: Sequence[str]) -> tuple[str, str, int] | None:
    """Why a WebSocket or an HTTP request may not open a session: (code, message, close code), or None."""
    # a browser page may connect only from this server's own origin (or one allowed by --allow-origin);
    # clients that send no Origin (not a browser) pass: the token guards those
    origin = conn.headers.get("origin")
    if origin is not None and origin not in allowed \
            and urlsplit(origin).netloc.lower() != conn.headers.get("host", "").lower():
        return "forbidden_origin", "pages of another origin may not connect", CLOSE_FORBIDDEN_ORIGIN
    if token is not None:
        given = conn.query_params.get("token")
        auth = conn.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            return ("unauthorized", "missing or wrong token (?token=... or Authorization: Bearer ...)",
                    CLOSE_UNAUTHORIZED)
    return None


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason), timeout=2.0)


async def _say(ws: WebSocket, ev: dict, code: int, reason: str, timeout: float | None = None) -> None:
    """Tell the client ``ev`` (if it still listens), then close."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.send_text(json.dumps(ev)), timeout)
    await _close(ws, code, reason)


async def serve_connection(server: LiveServer, ws: WebSocket, *, token: str | None = None,
                           allowed_origins: Sequence[str] = ()) -> None:
    """One WebSocket from accept to close: origin and token, a slot or ``busy``, the session, cleanup."""
    await ws.accept()
    refusal = _refusal(ws, token, allowed_origins)
    if refusal is None and server.shutting_down:
        refusal = ("server_shutdown", SHUTDOWN_MESSAGE, CLOSE_GOING_AWAY)
    if refusal is not None:
        await _say(ws, event("error", code=refusal[0], message=refusal[1], fatal=True), refusal[2], refusal[0])
        return
    slot = server.admit()
    if slot is None:
        await _say(ws, busy_event(server, say_where=True), CLOSE_BUSY, "busy")
        return
    conn = _Connection(server, ws, slot)
    server.attach(conn)
    try:
        await conn.run()
    finally:
        await conn.release("disconnected")


async def shutdown_connections(server: LiveServer, timeout: float = 5.0) -> int:
    """Server shutdown, on the serving loop: no new session, every client told ``server_shutdown`` and closed
    with 1001 ahead of anything queued for it. Returns how many connections had not ended after ``timeout`` s."""
    conns = server.begin_shutdown()
    for conn in conns:
        conn.going_away()
    if not conns:
        return 0
    _, pending = await asyncio.wait([asyncio.ensure_future(c.finished.wait()) for c in conns], timeout=timeout)
    for t in pending:
        t.cancel()
    return len(pending)


# SIGTERM / SIGINT to the end of ``serve_main``, at most (10 s with a second to spare): clients told and
# closed, uvicorn's own graceful stop (it then cancels what is left), session threads given time to zero
SHUTDOWN_S = {"clients": 3.0, "uvicorn": 2.0, "threads": 2.0}


def stop_on_signals(userver, server: LiveServer, loop: asyncio.AbstractEventLoop) -> None:
    """Make uvicorn's SIGINT / SIGTERM handler shut ``server`` down first (``shutdown_connections``), then
    stop uvicorn; a second signal stops it at once. Nothing is re-raised after: the process exits 0."""
    state: dict = {}

    async def drain() -> None:
        left = await shutdown_connections(server, timeout=SHUTDOWN_S["clients"])
        if left:
            log.warning("shutting down: %d connection(s) did not close in %g s", left, SHUTDOWN_S["clients"])
        userver.should_exit = True

    def handle_exit(sig, frame) -> None:  # the main thread, between two steps of the loop
        if "drain" in state:
            userver.should_exit = userver.force_exit = True
            return
        log.info("shutting down (%s): telling %d client(s)", signal.Signals(sig).name, len(server.running()))
        state["drain"] = None
        loop.call_soon_threadsafe(lambda: state.update(drain=loop.create_task(drain())))

    userver.handle_exit = handle_exit


def leave_stuck_sessions(server: LiveServer) -> None:
    """After a shutdown: give session threads ``SHUTDOWN_S["threads"]`` to end; if one is stuck (a hung
    device call cannot be interrupted), exit now with status 0 rather than wait for it at interpreter exit."""
    deadline = time.monotonic() + SHUTDOWN_S["threads"]
    stuck = [s for s in server.running() if not s.join(max(0.0, deadline - time.monotonic()))]
    if server.shutting_down and stuck:
        log.warning("%d session thread(s) still running after the shutdown: exiting without them", len(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _Connection(Control):
    """The two halves of one connection: a receiver (``Control.receive``) and a sender (events, bytes)."""

    def __init__(self, server: LiveServer, ws: WebSocket, slot):
        super().__init__(server, slot)
        self.ws = ws
        self._sender: asyncio.Task | None = None
        self._leaving = False  # going_away: the sender says server_shutdown and closes 1001

    async def run(self) -> None:
        self.loop, self.emit = asyncio.get_running_loop(), self._queue
        self.emit(self.hello())
        self._sender = asyncio.create_task(self._send_loop())
        if self._leaving:
            self._sender.cancel()
        tasks = {self._sender, asyncio.create_task(self._receive_loop())}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if self._leaving and self._sender.cancelled():  # cancelled before its first step: say it here
            await _say(self.ws, shutdown_event(), CLOSE_GOING_AWAY, "server_shutdown", 1.0)
        for t in pending:
            t.cancel()
        results = await asyncio.gather(*pending, return_exceptions=True)
        # every task's exception is retrieved here: one unexpected failure is logged once, the client told
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        failed += [r for r in results if isinstance(r, Exception)]
        if failed:
            await self._failed(failed[0])

    async def _failed(self, e: Exception) -> None:
        log.error("connection failed: %s: %s", type(e).__name__, e, exc_info=e)
        if self.session is not None:
            self.session.abort("error")
        await _say(self.ws, internal_error(e, "connection"), CLOSE_INTERNAL, "internal", 2.0)

    def going_away(self) -> None:
        """Server shutdown (on the loop): what is queued is dropped, the client gets ``server_shutdown`` and
        close 1001 now, even while a send to it is blocked."""
        self._leaving = True
        if self.session is not None:
            self.session.abort("server_shutdown")
        if self._sender is not None:
            self._sender.cancel()

    async def _send_loop(self) -> None:
        timeout = self.limits.client_timeout_s
        try:
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
        except asyncio.CancelledError:
            if not self._leaving:
                raise
            await _say(self.ws, shutdown_event(), CLOSE_GOING_AWAY, "server_shutdown", 1.0)

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        start_deadline = loop.time() + self.limits.start_timeout_s
        while True:
            try:
                if self.session is None and not self.closing:
                    msg = await asyncio.wait_for(self.ws.receive(), max(0.0, start_deadline - loop.time()))
                else:
                    msg = await self.ws.receive()
            except asyncio.TimeoutError:
                self.start_timed_out()
                continue
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            self.receive(msg.get("text") if msg.get("text") is not None else msg.get("bytes", b""))
