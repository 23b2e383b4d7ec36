"""What Ray Serve does with long-lived WebSockets, measured on this machine's Ray (CPU, no model): the facts
behind the admission and fault design of runtime/serve/ray.py and ray_proxy.py (README, "Scale-out on Ray
Serve").

    python bench/ray_admission.py        # ~2 min on 2 cores; writes bench/results/cpu-ray-admission.json

Trivial replicas (a WebSocket that holds one "session" until the client leaves; no torch) answer:
1. beyond: 2 replicas with ``max_ongoing_requests`` = 1: what a third connection gets, with
   ``max_queued_requests`` -1 (unbounded) and 1;
2. routing: 4 replicas of 1 session slot, each answering busy itself when taken (``max_ongoing_requests``
   = 1 + headroom); 3 sessions held, then a 4th: how often it lands on a full replica while one is free,
   with Ray's default router and with ``LeastLoadedRouter``;
3. loss: a replica SIGKILLed mid-stream: the close code its client sees, without and with ``SessionGuard``.
"""

# no `from __future__ import annotations`: FastAPI reads the route's `websocket: WebSocket` annotation in the
# replica, where this script's class arrives pickled by value
import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from fastapi import FastAPI, WebSocket  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.config import RequestRouterConfig  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from hallolive_rt.runtime.metrics import env_info  # noqa: E402
from hallolive_rt.runtime.serve.ray import PROXY_ENV  # noqa: E402
from hallolive_rt.runtime.serve.ray_proxy import ROUTER_PATH  # noqa: E402

ws_app = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=1)
@serve.ingress(ws_app)
class Holder:
    """Holds one session per connection until the client leaves; with ``slots``, answers busy when full."""

    def __init__(self, slots: int | None):
        self.slots, self.taken = slots, 0

    @ws_app.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        if self.slots is not None and self.taken >= self.slots:
            await websocket.send_text(json.dumps({"busy": os.getpid()}))
            await websocket.close(1013)
            return
        self.taken += 1
        try:
            await websocket.send_text(json.dumps({"pid": os.getpid()}))
            async def until_disconnect() -> None:  # nested: the replica gets this class pickled by value
                while (await websocket.receive())["type"] != "websocket.disconnect":
                    pass

            gone = asyncio.create_task(until_disconnect())
            with contextlib.suppress(Exception):  # a send racing the client's departure
                while not gone.done():  # a tick every 0.2 s (a stream) until the client leaves
                    await websocket.send_text("tick")
                    await asyncio.wait([gone], timeout=0.2)
        finally:
            self.taken -= 1


def _open(port: int, timeout: float = 5.0):
    c = connect(f"ws://127.0.0.1:{port}/ws", open_timeout=timeout, close_timeout=1)
    return c, json.loads(c.recv(timeout=timeout))


def _third(port: int) -> str:
    try:
        c, first = _open(port, timeout=4)
        with contextlib.suppress(ConnectionClosed):
            c.recv(timeout=1)
        c.close()
        return f"answered {first}, close {c.close_code}"
    except TimeoutError:
        return "handshake did not complete in 4 s (queued in the proxy)"
    except InvalidStatus as e:
        return f"HTTP {e.response.status_code} instead of a WebSocket handshake"


def beyond(port: int, tag: str) -> dict:
    out = {}
    for queued in (-1, 1):
        name = f"beyond-{queued}-{tag}"  # one application per setting: a proxy keeps a deployment's router
        serve.run(Holder.options(num_replicas=2, max_ongoing_requests=1, max_queued_requests=queued).bind(None),
                  name=name, route_prefix="/")
        held = [_open(port)[0] for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:  # two more at once: one may wait in the queue, the next one not
            first = pool.submit(_third, port)
            time.sleep(0.5)
            out[f"max_queued_requests={queued}"] = [first.result(), pool.submit(_third, port).result()]
        for c in held:
            c.close()
        serve.delete(name)
    return out


def routing(port: int, trials: int) -> dict:
    out = {}
    for name, router in (("ray default (power of two choices)", None), ("LeastLoadedRouter", ROUTER_PATH)):
        kw = {} if router is None else {"request_router_config": RequestRouterConfig(request_router_class=router)}
        app = "routing-default" if router is None else "routing-least-loaded"
        serve.run(Holder.options(num_replicas=4, max_ongoing_requests=9, **kw).bind(1), name=app, route_prefix="/")
        wrong = 0
        for _ in range(trials):
            held = [_open(port) for _ in range(3)]
            c, first = _open(port)
            wrong += "busy" in first or any("busy" in f for _, f in held)
            for x, _ in held + [(c, first)]:
                x.close()
            time.sleep(1.0)  # the replicas see the clients leave
        out[name] = {"trials": trials, "a session got busy while a slot was free": wrong}
        serve.delete(app)
    return out


def loss(port: int, name: str) -> str:
    serve.run(Holder.options(num_replicas=2, max_ongoing_requests=4).bind(None), name=name, route_prefix="/")
    c, first = _open(port)
    c.recv(timeout=5)
    os.kill(first["pid"], signal.SIGKILL)
    last = None
    try:
        while True:
            msg = c.recv(timeout=20)
            last = msg if msg != "tick" else last
    except ConnectionClosed:
        pass
    serve.delete(name)
    return f"close {c.close_code}" + (f" after {last}" if last else ", nothing said")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-ray-admission.json"))
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=96 * 2**20)
    res = {"command": "python bench/ray_admission.py" + (f" --trials {a.trials}" if a.trials != 10 else ""),
           "ray": ray.__version__, "env": env_info()}
    try:
        for guard in (False, True):  # the proxy's options are fixed when Serve starts: one Serve per setting
            opts = {"controller_options": {"runtime_env": {"env_vars": PROXY_ENV}}} if guard else {}
            serve.start(http_options={"host": "127.0.0.1", "port": port}, **opts)
            tag = "with" if guard else "without"
            res[f"1 beyond max_ongoing_requests (2 replicas x 1), {tag} SessionGuard"] = beyond(port, tag)
            if not guard:
                res["2 routing (4 replicas x 1 slot, 3 held, a 4th)"] = routing(port, a.trials)
            res[f"3 replica killed mid-stream ({tag} SessionGuard)"] = loss(port, f"loss-{tag}")
            serve.shutdown()
    finally:
        ray.shutdown()
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "env"}, indent=2))


if __name__ == "__main__":
    main()
