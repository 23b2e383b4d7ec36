"""Hypothesis fuzz of the WebSocket protocol against one server in this process (tiny preset, CPU): random
scripts of well-formed messages with random fields, random JSON, text, binary and oversized messages, sent
before a start, mid-block, between blocks and after a stop, ending in a close, a disconnect or nothing, with
a second client now and then. Whatever comes, the server answers only with documented events and close
codes (no ``internal`` error: nothing a client sends is a server failure), logs no error, and returns to
idle after each script: slots free, its threads back to the baseline, ``/health`` ok; at the end no
tensor and no session object is left. 25 scripts, about 40 s on 2 cores."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
import threading
import urllib.request

import pytest

pytest.importorskip("av")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.frames import CloseCode  # noqa: E402

from hallolive_rt.options import DiTOptions, ModelSource  # noqa: E402
from hallolive_rt.runtime.serve.launch import build_server  # noqa: E402
from hallolive_rt.runtime.serve.protocol import CLOSE_CODES, ERROR_CODES, EVENTS, Limits  # noqa: E402
from hallolive_rt.runtime.serve.sessions import LiveSession  # noqa: E402
from tests.serve_helpers import Client, full_session, running_server, wait_for, wait_idle  # noqa: E402

PROMPT = "A man in a grey coat says: <S>good evening<E>"
LIMITS = Limits(max_message_bytes=4096, client_timeout_s=3.0, start_timeout_s=2.0, max_bad_messages=6,
                max_unacked_blocks=2)
SOCKET_LIMIT = 4 * LIMITS.max_message_bytes  # the server's ws_max_size


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        if not record.name.startswith("websockets.client"):  # the server's records, not the test clients'
            self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed():
    live = build_server(model=ModelSource(preset="tiny", seed=0), dit=DiTOptions(kv_impl="torch"),
                        limits=LIMITS)
    errors = _Records()
    logging.getLogger().addHandler(errors)
    try:
        with running_server(live) as addr:
            full_session(addr, prompt=PROMPT, seed=0, blocks=1).close()  # warm: the baseline's shape
            wait_idle(live)
            yield {"live": live, "addr": addr, "threads": _server_threads(), "tensors": _tensors(),
                   "errors": errors}
    finally:
        logging.getLogger().removeHandler(errors)


def _server_threads() -> list[str]:
    """Python threads less the test's own WebSocket clients' (their recv / keepalive threads)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.endswith(("(recv_events)", "(keepalive)")))


def _tensors() -> int:
    import torch

    gc.collect()
    return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())


# ---- what a client sends ---------------------------------------------------------------------------------
prompts = st.one_of(st.just(PROMPT), st.text(max_size=30), st.just("hi \ud800"), st.just("x" * 2001),
                    st.just("  "), st.just("a\x00b"))
ints = st.one_of(st.integers(-3, 4), st.just(10**12), st.just(2**53), st.integers())
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=6)
start = st.fixed_dictionaries(
    {"type": st.just("start"), "prompt": prompts},
    optional={"seed": st.one_of(ints, anything), "blocks": st.one_of(st.none(), st.integers(1, 3), ints),
              "future_audio_frames": st.one_of(st.none(), st.integers(0, 31)), "v": st.sampled_from([1, 2]),
              "extra": anything})
messages = st.one_of(
    start,
    st.fixed_dictionaries({"type": st.just("prompt"), "prompt": prompts}),
    st.fixed_dictionaries({"type": st.just("ack")}, optional={"block": st.one_of(ints, anything)}),
    st.just({"type": "stop"}),
    st.dictionaries(st.sampled_from(["type", "prompt", "block", "v"]), anything, max_size=3),
)
actions = st.one_of(
    st.tuples(st.just("json"), messages),
    st.tuples(st.just("text"), st.text(max_size=40)),
    st.tuples(st.just("binary"), st.binary(max_size=40)),
    st.tuples(st.just("oversized"), st.sampled_from([4097, 20000])),  # ours (1009), the socket's (1009)
    st.tuples(st.just("read"), st.integers(1, 6), st.booleans()),  # read n events, acknowledging blocks or not
    st.tuples(st.just("second"), st.none()),  # another client at the same time: hello or busy
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("disconnect"), st.none()),
)
GOOD_START = ("json", {"type": "start", "prompt": PROMPT, "seed": 1, "blocks": 1})


def _check_event(ev: dict) -> None:
    assert ev.get("v") == 1 and ev.get("type") in EVENTS, ev
    if ev["type"] == "error":
        assert ev["code"] in ERROR_CODES and isinstance(ev["fatal"], bool) and ev["message"], ev
        assert ev["code"] not in ("internal", "stalled"), ev  # nothing a client sends fails the server


def _read(c: Client, n: int, ack: bool, timeout: float = 2.0) -> bool:
    """Up to n events (each checked); False once the server closed."""
    c.timeout = timeout
    for _ in range(n):
        try:
            ev = c.recv()
        except TimeoutError:
            return True
        if ev is None:
            return False
        _check_event(ev)
        if ack and ev["type"] == "block":
            try:
                c.send(type="ack", block=ev["index"])
            except ConnectionClosed:
                return False
    return True


def _run_script(addr: str, script: list) -> None:
    c = Client(addr, timeout=5)
    open_ = _read(c, 1, False, timeout=5)
    assert c.events and c.events[0]["type"] == "hello"
    ended_by_client, past_socket_limit, sent_after = False, False, False
    for act in script:
        if not open_:
            break
        kind, arg = act[0], act[1]
        sent_after |= past_socket_limit and kind in ("json", "text", "binary", "oversized")
        past_socket_limit |= kind == "oversized" and arg > SOCKET_LIMIT
        try:
            if kind == "json":
                c.ws.send(json.dumps(arg))
            elif kind == "text":
                c.ws.send(arg)
            elif kind == "binary":
                c.ws.send(arg)
            elif kind == "oversized":
                c.ws.send(json.dumps({"type": "prompt", "prompt": "y" * arg}))
            elif kind == "read":
                open_ = _read(c, arg, act[2])
            elif kind == "second":
                other = Client(addr, timeout=5)
                first = other.recv()
                _check_event(first)
                assert first["type"] in ("hello", "busy")
                other.close()
            elif kind == "close":
                c.close()
                ended_by_client, open_ = True, False
            elif kind == "disconnect":  # gone without a close handshake (the server may have closed already)
                with contextlib.suppress(OSError):
                    c.ws.socket.shutdown(socket.SHUT_RDWR)
                c.ws.socket.close()
                ended_by_client, open_ = True, False
        except ConnectionClosed:
            open_ = False
    if open_ and _read(c, 10, True, timeout=0.5):  # what the server still says within a moment
        c.close()  # then the client leaves
        ended_by_client = True
    if not ended_by_client:
        # past the socket's own limit the server fails the connection (RFC 6455 7.1.7: close 1009, then the
        # TCP close); what the client sent after that is unread, so the server's TCP stack may reset the
        # connection and the client lose the close frame: 1006 is then the client's side of a 1009
        lost = {CloseCode.ABNORMAL_CLOSURE} if sent_after else set()
        assert c.close_code in CLOSE_CODES | lost, (c.close_code, c.types()[-4:])


@settings(max_examples=25, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(script=st.lists(actions, max_size=7))
@example(script=[GOOD_START, ("read", 6, True)])
@example(script=[("json", {"type": "start", "prompt": PROMPT, "blocks": None}), ("read", 3, True),
                 ("json", {"type": "prompt", "prompt": "next"}), ("read", 2, False), ("disconnect", None)])
@example(script=[GOOD_START, ("json", {"type": "stop"}), ("read", 6, True), ("json", {"type": "ack", "block": 0}),
                 ("text", "after"), ("binary", b"\x00")])
@example(script=[("json", {"type": "stop"}), ("oversized", 4097), ("read", 2, False)])
@example(script=[("json", {"type": "start", "prompt": "x"}), ("oversized", 20000), ("oversized", 20000),
                 ("oversized", 4097)])
@example(script=[("json", {"type": ["start"]}), ("text", "[" * 1500 + "]" * 1500), ("read", 2, False),
                 ("json", {"type": "start", "prompt": "hi \ud800"}), ("read", 1, False), GOOD_START,
                 ("json", {"type": "prompt", "prompt": "\udfff"}), ("read", 8, True)])
def test_no_message_sequence_breaks_the_server(fuzzed, script):
    live, addr = fuzzed["live"], fuzzed["addr"]
    _run_script(addr, script)
    wait_idle(live)
    wait_for(lambda: _server_threads() == fuzzed["threads"], 10, "the server's threads to return to the baseline")
    health = json.loads(urllib.request.urlopen(f"http://{addr}/health", timeout=10).read())
    assert health["status"] == "ok" and health["active_sessions"] == 0 and health["stuck_sessions"] == 0
    assert not fuzzed["errors"].records, [r.getMessage() for r in fuzzed["errors"].records]


def test_after_the_fuzz_nothing_is_left(fuzzed):
    live, addr = fuzzed["live"], fuzzed["addr"]
    full_session(addr, prompt=PROMPT, seed=0, blocks=1).close()  # the baseline's shape again
    wait_idle(live)
    wait_for(lambda: gc.collect() >= 0 and not [o for o in gc.get_objects() if isinstance(o, LiveSession)], 10,
             "every LiveSession to be freed")
    assert _tensors() == fuzzed["tensors"]
    st = live.stats()
    assert st["sessions_ended"].get("error", 0) == 0 and st["sessions_total"] >= 5  # the examples' sessions ran
    assert not fuzzed["errors"].records, [r.getMessage() for r in fuzzed["errors"].records]
