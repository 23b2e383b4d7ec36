"""The HTTP front of a ``LiveServer`` (FastAPI on uvicorn): the page, ``/health``, ``/ws`` and, with
WebRTC on, ``/webrtc/offer``. ``create_app(server, token=...)`` builds the app; ``serve_connection`` is the
whole life of one WebSocket (checks, admission, the session, the cleanup) for any ASGI route, so a Ray
replica wraps the same function. An unexpected exception in a connection's tasks is an ``internal`` error
and close 1011; SIGTERM / SIGINT (``stop_on_signals``) end every connection with ``server_shutdown`` and
close 1001 first. The page is three files of package data read once: no request path reaches the disk.
"""

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

from .control import SHUTDOWN_MESSAGE, Control
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


def _read_page() -> dict[str, tuple[bytes, str]]:
    static = resources.files(__package__) / "static"
    return {route: ((static / name).read_bytes(), ctype) for route, (name, ctype) in PAGE_FILES.items()}


def create_app(server: LiveServer, *, token: str | None = None, allowed_origins: Sequence[str] = (),
               webrtc: bool = False, ice_servers: Sequence[str] = ()) -> FastAPI:
    """The app of one process: ``GET /`` (the page), ``GET /health`` (``server.stats()``), ``WS /ws``; with
    ``webrtc``, ``POST /webrtc/offer`` (``webrtc.answer_offer``) under the same origin and token rules."""
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


def _refusal(conn, token: str | None, allowed: Sequence[str]) -> tuple[str, str] | None:
    """Why a WebSocket or an HTTP request (both carry headers and query) may not open a session, or None."""
    if not _origin_ok(conn, allowed):
        return "forbidden_origin", "pages of another origin may not connect"
    if token is not None and not _token_ok(conn, token):
        return "unauthorized", "missing or wrong token (?token=... or Authorization: Bearer ...)"
    return None


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
    refusal = _refusal(ws, token, allowed_origins)
    if refusal is not None:
        refusal = (*refusal, CLOSE_FORBIDDEN_ORIGIN if refusal[0] == "forbidden_origin" else CLOSE_UNAUTHORIZED)
    elif server.shutting_down:
        refusal = ("server_shutdown", SHUTDOWN_MESSAGE, CLOSE_GOING_AWAY)
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
    server.attach(conn)
    try:
        await conn.run()
    finally:
        if conn.session is None:
            server.release(slot)
        else:  # the session releases its slot when its thread ends (not waited for once shutting down)
            conn.session.abort("disconnected")
            while not conn.session.join(timeout=0) and not server.shutting_down:
                await asyncio.sleep(0.02)
        server.detach(conn)
        conn.finished.set()


async def shutdown_connections(server: LiveServer, timeout: float = 5.0) -> int:
    """Server shutdown, on the serving loop: no new session, every running one aborted, every client told
    ``server_shutdown`` and closed with 1001 ahead of anything still queued for it. Returns once every
    connection has ended, or after ``timeout`` s: how many had not."""
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
        self.out: asyncio.Queue = asyncio.Queue()
        self.finished = asyncio.Event()
        self._sender: asyncio.Task | None = None
        self._leaving = False  # going_away: the sender says server_shutdown and closes 1001

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
        self._sender = asyncio.create_task(self._send_loop())
        if self._leaving:
            self._sender.cancel()
        tasks = {self._sender, asyncio.create_task(self._receive_loop())}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if self._leaving and self._sender.cancelled():  # cancelled before its first step: say it here
            await self._say_going_away()
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
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.send_text(json.dumps(internal_error(e, "connection"))), timeout=2.0)
        await _close(self.ws, CLOSE_INTERNAL, "internal")

    def going_away(self) -> None:
        """Server shutdown (on the loop): what is queued is dropped, the client gets ``server_shutdown`` and
        close 1001 now, even while a send to it is blocked."""
        self._leaving = True
        if self.session is not None:
            self.session.abort("server_shutdown")
        if self._sender is not None:
            self._sender.cancel()

    async def _send_loop(self) -> None:
        try:
            await self._send_queued()
        except asyncio.CancelledError:
            if not self._leaving:
                raise
            await self._say_going_away()

    async def _say_going_away(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.send_text(json.dumps(event(
                "error", code="server_shutdown", message=SHUTDOWN_MESSAGE, fatal=True))), timeout=1.0)
        await _close(self.ws, CLOSE_GOING_AWAY, "server_shutdown")

    async def _send_queued(self) -> None:
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
                self.close_after(CLOSE_TIMEOUT, "start_timeout")
                continue
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            self.receive(msg.get("text") if msg.get("text") is not None else msg.get("bytes", b""))
