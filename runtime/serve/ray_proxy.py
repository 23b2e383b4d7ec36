"""What runs in Ray Serve's proxy (one per node) for live sessions: ``LeastLoadedRouter``, which puts a new
connection on the replica with the fewest ongoing requests (probed at each request, so proxies on several
nodes see each other's sessions), and ``SessionGuard``, an ASGI middleware that gives a client a protocol
event (``replica_lost``, ``unavailable``) where Ray's proxy would drop its socket. No torch: the proxy
imports it; ``ray.py`` names both by import path. Why admission works this way: ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import json
import logging
import random

from ray.serve.request_router import FIFOMixin, RequestRouter
from starlette.middleware import Middleware

from .protocol import CLOSE_BUSY, CLOSE_INTERNAL, event

__all__ = ["LeastLoadedRouter", "SessionGuard", "proxy_middlewares", "ROUTER_PATH", "PROXY_CALLBACK_PATH",
           "PROXY_CALLBACK_ENV", "WS_PATH"]

log = logging.getLogger("hallolive_rt.serve")

ROUTER_PATH = "hallolive_rt.runtime.serve.ray_proxy.LeastLoadedRouter"
PROXY_CALLBACK_PATH = "hallolive_rt.runtime.serve.ray_proxy.proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # read by Ray's proxy when it starts
WS_PATH = "/ws"


class LeastLoadedRouter(FIFOMixin, RequestRouter):
    """All replicas in one rank, fresh counts: Ray's router then takes the one with the fewest ongoing
    requests among those below ``max_ongoing_requests`` (ties: a random one)."""

    # the probe's first deadline (Ray's default: 0.1 s, then doubling): the probes run in parallel and the
    # wait ends when all have answered, so a longer one costs nothing unless a replica is slow to answer;
    # then a busy (or CPU-bound) replica may answer late rather than be passed over for a full one
    queue_len_response_deadline_s = 1.0

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        cache = self.replica_queue_len_cache
        for r in candidate_replicas:
            cache.invalidate_key(r.replica_id)  # probe now: another node's proxy may have placed sessions
        replicas = list(candidate_replicas)
        random.shuffle(replicas)
        return [replicas]


class SessionGuard:
    """ASGI middleware for Ray's proxy, on live-session WebSockets only (path ending in ``/ws``): where the
    replica died after the handshake (Ray would drop the TCP connection: 1006), ``replica_lost`` and close 1011;
    where the proxy answered an HTTP error before any replica accepted, ``unavailable`` and close 1013 (503 /
    429) or 1011. A close the replica sent, or a client that left, passes through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket" or not scope.get("path", "").endswith(WS_PATH):
            return await self.app(scope, receive, send)
        st = {"accepted": False, "closed": False, "gone": False, "http_status": None}

        async def guarded_receive():
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                st["gone"] = True
            return msg

        async def guarded_send(msg):
            kind = msg["type"]
            if kind.startswith("http.response"):  # the proxy's HTTP error for a WebSocket: answered below
                if kind == "http.response.start":
                    st["http_status"] = msg.get("status")
                return
            if kind == "websocket.accept":
                st["accepted"] = True
            elif kind == "websocket.close":
                st["closed"] = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:  # noqa: BLE001 - the proxy failed this connection: say so to the client below
            log.exception("live-session WebSocket failed in the proxy")
        if st["closed"] or st["gone"]:
            return
        if st["accepted"]:
            code, close, message = ("replica_lost", CLOSE_INTERNAL,
                                    "the server replica running this session stopped; start a new session")
        else:
            status = st["http_status"]
            close = CLOSE_BUSY if status in (503, 429) else CLOSE_INTERNAL
            code, message = "unavailable", f"no server replica could take the session (HTTP {status}): try again"
        try:
            if not st["accepted"]:
                await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": json.dumps(event("error", code=code, message=message,
                                                                            fatal=True))})
            await send({"type": "websocket.close", "code": close, "reason": code})
        except Exception:  # noqa: BLE001 - the client's socket is gone too: nothing left to tell
            pass


def proxy_middlewares() -> list:
    """For ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (Ray's proxy calls it once at start)."""
    return [Middleware(SessionGuard)]
