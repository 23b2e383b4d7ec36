"""Test helpers for live sessions: a uvicorn server in a thread of the test process (so the test can
inspect its LiveServer, threads and memory) and a small protocol client on the websockets library."""

from __future__ import annotations

import contextlib
import json
import threading
import time

from hallolive_rt.runtime.serve.protocol import CLOSE_NORMAL


def tiny_live():
    """The LiveServer the serve tests share: tiny preset, seed 0, the pure-torch KV ops (nothing to build)."""
    from hallolive_rt.options import DiTOptions, ModelSource
    from hallolive_rt.runtime.serve.launch import build_server

    return build_server(model=ModelSource(preset="tiny", seed=0), dit=DiTOptions(kv_impl="torch"))


@contextlib.contextmanager
def running_server(live, *, token=None, allowed_origins=(), **app_kw):
    """Serve ``create_app(live)`` on 127.0.0.1 (a free port) from a thread; yields ``host:port``."""
    import uvicorn

    from hallolive_rt.runtime.serve.app import create_app

    app = create_app(live, token=token, allowed_origins=allowed_origins, **app_kw)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            ws_max_size=4 * live.limits.max_message_bytes, ws_per_message_deflate=False)
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(30)


class Client:
    """A protocol-v1 client: JSON events and the binaries they announce, acks after each block."""

    def __init__(self, addr: str, *, token: str | None = None, origin: str | None = None, timeout: float = 60):
        from websockets.sync.client import connect

        url = f"ws://{addr}/ws" + (f"?token={token}" if token else "")
        headers = {"Origin": origin} if origin else None
        self._cm = connect(url, additional_headers=headers, open_timeout=timeout, max_size=2**24)
        self.ws = self._cm.__enter__()  # the connection's life is the test's: closed by close() or the server
        self.timeout = timeout
        self.events: list[dict] = []
        self.media: list[tuple[dict, bytes]] = []  # (announcing event, bytes)

    def send(self, **msg) -> None:
        self.ws.send(json.dumps(msg))

    def recv(self) -> dict | None:
        """The next event (its binary, if any, read with it); None once the server closed."""
        from websockets.exceptions import ConnectionClosed

        try:
            raw = self.ws.recv(timeout=self.timeout)
        except ConnectionClosed:
            return None
        ev = json.loads(raw)
        self.events.append(ev)
        if "bytes" in ev and ev["type"] in ("init", "block", "tail"):
            data = self.ws.recv(timeout=self.timeout)
            assert isinstance(data, bytes) and len(data) == ev["bytes"], (ev, type(data))
            self.media.append((ev, data))
        return ev

    def until(self, kind: str) -> dict:
        while True:
            ev = self.recv()
            assert ev is not None, f"closed ({self.close_code}) before a {kind!r} event; got {self.types()}"
            if ev["type"] == kind:
                return ev

    def run(self, *, ack: bool = True, on_block=None) -> list[dict]:
        """Read to the end of the session, acknowledging each block; returns every event."""
        while True:
            ev = self.recv()
            if ev is None:
                return self.events
            if ev["type"] == "block":
                if on_block is not None:
                    on_block(self, ev)
                if ack:
                    from websockets.exceptions import ConnectionClosed

                    with contextlib.suppress(ConnectionClosed):  # the session may have ended since
                        self.send(type="ack", block=ev["index"])

    def stream_bytes(self) -> bytes:
        return b"".join(data for _, data in self.media)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def close(self) -> None:
        self.ws.close()


def session(addr: str, **start) -> Client:
    """Connect, check hello, send start; the caller reads on."""
    c = Client(addr)
    hello = c.until("hello")
    assert hello["v"] == 1
    c.send(type="start", **start)
    return c


def full_session(addr: str, **start) -> Client:
    c = session(addr, **start)
    c.run()
    assert c.close_code == CLOSE_NORMAL, (c.close_code, c.types()[-5:])
    return c


def decode_mp4(data: bytes):
    """Every video frame (rgb24) and every audio sample PyAV decodes from an fMP4 in memory."""
    import io

    import av
    import numpy as np

    frames, samples = [], []
    with av.open(io.BytesIO(data), format="mp4") as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24"))
    with av.open(io.BytesIO(data), format="mp4") as c:
        for f in c.decode(audio=0):
            samples.append(f.to_ndarray().reshape(-1))
    return np.stack(frames), np.concatenate(samples)


def run_concurrently(clients, timeout: float = 180) -> None:
    """``Client.run`` of every client at once, each on its own thread (each acknowledges its blocks)."""
    errors = []

    def run(c):
        try:
            c.run()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,), name="test-client") for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    if errors:
        raise errors[0]


def wait_for(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_idle(live, timeout: float = 30.0) -> None:
    """Every slot free and every session / pipeline thread ended."""
    wait_for(lambda: live.stats()["active_sessions"] == 0, timeout, "the session slots to be free")
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("hallolive-")], timeout,
             "session / pipeline threads to end")


def read_to_close(c: Client) -> list[dict]:
    """Every event until the server closes, acknowledging nothing."""
    while c.recv() is not None:
        pass
    return c.events


def serve_with_a_stuck_session() -> None:
    """The CLI (``sys.argv``: ``serve ...``) in which the first session's DiT blocks for good in its first
    step, as a hung device call would leave it; every other session runs as usual."""
    from hallolive_rt.cli import app
    from hallolive_rt.stream import BlockStream

    eager_step = BlockStream.eager_step

    def step(self, *args, **kwargs):
        if threading.current_thread().name.endswith("-1"):  # the thread of session "<replica>-1"
            threading.Event().wait()
        return eager_step(self, *args, **kwargs)

    BlockStream.eager_step = step
    app(prog_name="hallolive-rt")
