"""Faults in live sessions and at the server's edges, tiny preset on CPU: the DiT, the video decoder, the audio
decoder or the muxer raising mid-stream (an out-of-memory error among them) ends that session alone with an
``internal`` error naming the stage and close 1011, logged once, and the next session sends the bytes of the
first session of a fresh server; a session that makes no block for ``block_timeout_s`` is ended as
``stalled``; a start for 10**12 blocks streams at once; a prompt with a lone surrogate is refused; an
unexpected exception in a connection's tasks is an error event and close 1011; SIGTERM stops
`hallolive-rt serve` within 10 s, each client told ``server_shutdown`` and closed with 1001. ~60 s on 2 cores."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("av")

from hallolive_rt.model.audio_stream import StreamingAudioDecoder  # noqa: E402
from hallolive_rt.runtime.media import StreamWriter  # noqa: E402
from hallolive_rt.runtime.serve import control as control_module  # noqa: E402
from hallolive_rt.runtime.serve.protocol import (CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, Limits,  # noqa: E402
                                                 ProtocolError)
from hallolive_rt.runtime.serve.sessions import LiveSession  # noqa: E402
from tests.serve_helpers import (tiny_live, Client, full_session, read_to_close, run_concurrently, running_server,  # noqa: E402
                                 session, wait_for, wait_idle)

PROMPT = "A man in a grey coat says: <S>good evening<E>"
SEED = 5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live():
    return tiny_live()


@pytest.fixture(scope="module")
def addr(live):
    with running_server(live) as a:
        yield a


def _targets(live) -> dict:
    """Where each stage's fault is injected: (owner, attribute)."""
    return {"dit": (live.c.dit, "forward"), "vae_video": (live.c.video_decoder, "decode_frame"),
            "vae_audio": (StreamingAudioDecoder, "step"), "writer": (StreamWriter, "write_block")}


class Fault:
    """Wraps a callable: counts calls, raises ``exc(*args)`` at call ``at`` (or blocks on ``hang`` from there);
    a new exception each time (one kept across tests would keep the failed session alive in its traceback)."""

    def __init__(self, at: int | None = None, exc: tuple | None = None, hang: threading.Event | None = None):
        self.at, self.exc, self.hang, self.calls = at, exc, hang, 0

    def wrap(self, orig):
        def call(*args, **kwargs):
            self.calls += 1
            if self.at is not None and self.calls >= self.at:
                if self.hang is not None:
                    self.hang.wait(60)
                elif self.calls == self.at:
                    raise self.exc[0](*self.exc[1:])
            return orig(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def reference(addr, live):
    """The first session of the fresh server (3 blocks), and the calls per block of each fault's target."""
    mp = pytest.MonkeyPatch()
    counters = {}
    try:
        for stage, (owner, name) in _targets(live).items():
            counters[stage] = Fault()
            mp.setattr(owner, name, counters[stage].wrap(getattr(owner, name)))
        data = full_session(addr, prompt=PROMPT, seed=SEED, blocks=3).stream_bytes()
    finally:
        mp.undo()
    assert all(c.calls % 3 == 0 and c.calls > 0 for c in counters.values()), {k: c.calls for k, c in counters.items()}
    wait_idle(live)
    return {"bytes": data, "per_block": {k: c.calls // 3 for k, c in counters.items()}}


def _serve_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("stage,exc", [
    ("dit", (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 2.00 GiB (injected)")),
    ("vae_video", (RuntimeError, "video decoder failed (injected)")),
    ("vae_audio", (RuntimeError, "audio decoder failed (injected)")),
    ("writer", (OSError, 28, "No space left on device (injected)")),
])
def test_a_stage_failing_mid_stream_ends_that_session_alone(addr, live, reference, stage, exc, monkeypatch, caplog):
    before = live.stats()["sessions_ended"].get("error", 0)
    owner, name = _targets(live)[stage]
    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as m:
        m.setattr(owner, name, Fault(reference["per_block"][stage] + 1, exc).wrap(getattr(owner, name)))
        c = session(addr, prompt=PROMPT, seed=SEED, blocks=3)  # fails on block 1's first call
        c.run()
        wait_idle(live)
    err = c.events[-1]
    assert err["type"] == "error" and err["code"] == "internal" and err["stage"] == stage and err["fatal"], err
    assert "injected" in err["message"] and exc[0].__name__ in err["message"]
    assert c.close_code == CLOSE_INTERNAL and "end" not in c.types()
    assert [e["index"] for e in c.events if e["type"] == "block"] == [0]  # mid-stream: block 0 went out
    st = live.stats()
    assert st["sessions_ended"]["error"] == before + 1 and st["active_sessions"] == 0
    errors = _serve_errors(caplog)
    assert len(errors) == 1 and f"failed in {stage}" in errors[0].getMessage(), [r.getMessage() for r in errors]
    # the state was zeroed in place (same slot, same stream shape): nothing of the failed stream is left
    assert full_session(addr, prompt=PROMPT, seed=SEED, blocks=3).stream_bytes() == reference["bytes"]
    wait_idle(live)


def test_a_session_that_makes_no_block_is_ended_as_stalled(addr, live, reference, monkeypatch):
    monkeypatch.setattr(live, "limits", Limits(block_timeout_s=2.0))
    before = live.stats()["sessions_ended"].get("stalled", 0)
    release = threading.Event()
    with monkeypatch.context() as m:  # block 1's first DiT forward hangs until released
        m.setattr(live.c.dit, "forward", Fault(reference["per_block"]["dit"] + 1, hang=release).wrap(live.c.dit.forward))
        c = session(addr, prompt=PROMPT, seed=SEED, blocks=3)
        c.run()
        err = c.events[-1]
        assert err["type"] == "error" and err["code"] == "stalled" and err["fatal"] and c.close_code == CLOSE_INTERNAL
        assert [e["index"] for e in c.events if e["type"] == "block"] == [0]
        assert live.stats()["stuck_sessions"] == 1  # the thread is still in the forward: the slot is not back
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://{addr}/health", timeout=10)
        assert health.value.code == 503 and json.loads(health.value.read())["status"] == "degraded"
        release.set()
        wait_idle(live)
    st = live.stats()
    assert st["stuck_sessions"] == 0 and st["sessions_ended"]["stalled"] == before + 1
    assert json.loads(urllib.request.urlopen(f"http://{addr}/health", timeout=10).read())["status"] == "ok"
    assert full_session(addr, prompt=PROMPT, seed=SEED, blocks=3).stream_bytes() == reference["bytes"]
    wait_idle(live)


def test_a_start_for_a_trillion_blocks_streams_at_once_and_frees_its_slot(addr, live, reference):
    c = Client(addr, timeout=20)
    c.until("hello")
    t = time.monotonic()
    c.send(type="start", prompt=PROMPT, seed=SEED, blocks=10**12)
    assert c.until("started")["blocks"] == 10**12
    assert c.until("block")["index"] == 0
    took = time.monotonic() - t
    assert took < 10, f"{took:.1f} s to the first block of a 10**12-block session"  # a tiny block: ~0.5 s here
    c.ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close handshake
    c.ws.socket.close()
    wait_idle(live)
    assert full_session(addr, prompt=PROMPT, seed=SEED, blocks=3).stream_bytes() == reference["bytes"]
    wait_idle(live)


def test_a_lone_surrogate_in_a_prompt_is_refused(addr, live):
    with pytest.raises(ProtocolError) as e:  # the tokenizer's path (what the protocol lets through is valid)
        live.check_prompt("hi \ud800")
    assert e.value.code == "bad_prompt"
    c = Client(addr)
    c.until("hello")
    c.ws.send('{"type": "start", "prompt": "hi \\ud800"}')  # valid JSON for an invalid string
    err = c.until("error")
    assert err["code"] == "bad_prompt" and not err["fatal"] and "surrogate" in err["message"]
    c.send(type="start", prompt=PROMPT, seed=SEED, blocks=1)
    c.until("started")
    c.ws.send('{"type": "prompt", "prompt": "\\udfff"}')
    c.run()
    assert "bad_prompt" in [e.get("code") for e in c.events] and c.close_code == CLOSE_NORMAL
    wait_idle(live)


def _raise(*args, **kwargs):
    raise RuntimeError("a bug (injected)")


@pytest.mark.parametrize("where", ["before_start", "mid_session"])
def test_an_unexpected_exception_in_a_connection_is_an_error_and_close_1011(addr, live, monkeypatch, caplog, where):
    caplog.set_level(logging.WARNING)
    with monkeypatch.context() as m:
        c = Client(addr)
        c.until("hello")
        if where == "before_start":
            m.setattr(control_module, "parse_message", _raise)
            c.send(type="stop")
        else:
            m.setattr(LiveSession, "ack", _raise)
            c.send(type="start", prompt=PROMPT, seed=SEED, blocks=None)
            c.until("block")
            c.send(type="ack", block=0)
        read_to_close(c)
        wait_idle(live)
    err = c.events[-1]
    assert err["type"] == "error" and err["code"] == "internal" and err["stage"] == "connection" and err["fatal"]
    assert c.close_code == CLOSE_INTERNAL and live.stats()["active_sessions"] == 0
    del c
    gc.collect()  # a task whose exception nobody retrieved says so when it is collected
    errors = _serve_errors(caplog)
    assert len(errors) == 1 and "connection failed" in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert full_session(addr, prompt=PROMPT, seed=SEED, blocks=1).types()[-1] == "end"
    wait_idle(live)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_serve_within_10_s_whatever_its_sessions_do(tmp_path):
    """`hallolive-rt serve` (the CLI's own entry point, in a process of its own) whose first session is stuck
    in the DiT for good; a second session streams, a third client has only said hello."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("HALLOLIVE_TOKEN", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", "from tests.serve_helpers import serve_with_a_stuck_session; "
                             "serve_with_a_stuck_session()", "serve", "--preset", "tiny", "--port", str(port),
                             "--max-sessions", "3", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        addr = f"127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or "live sessions at" in (tmp_path / "serve.log").read_text(),
                 120, "the server to start")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        stuck = session(addr, prompt=PROMPT, seed=1, blocks=None)
        stuck.until("started")
        streaming = session(addr, prompt=PROMPT, seed=2, blocks=None)
        streaming.until("block")
        idle = Client(addr)
        idle.until("hello")
        time.sleep(0.5)  # the first session is in its stuck forward by now (it never makes a block)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        run_concurrently([stuck, streaming, idle], timeout=15)
        rc = proc.wait(max(0.1, 10 - (time.monotonic() - t)))
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "serve.log").read_text()
    assert rc == 0 and took < 10, (rc, took, out[-3000:])
    assert not re.search(r"Traceback|never retrieved", out), out[-3000:]
    for c in (stuck, streaming, idle):
        last = c.events[-1]
        assert last["type"] == "error" and last["code"] == "server_shutdown" and last["fatal"], c.types()[-3:]
        assert c.close_code == CLOSE_GOING_AWAY
    assert not [e for e in stuck.events if e["type"] == "block"]
    assert [e["type"] for e in streaming.events].count("block") >= 1
