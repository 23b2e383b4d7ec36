"""Live sessions over WebRTC with a Python aiortc peer (tiny preset, CPU, loopback, host candidates only):
the frames received are the frames the session generates (within VP8's loss), video and audio carry the
writer's integer clock, a prompt switch on the data channel is applied, a peer that vanishes frees its slot
within the client timeout, and sessions in a row leave threads and memory flat."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("aiortc")

from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from hallolive_rt.runtime.serve.protocol import CLOSE_NORMAL, CLOSE_TIMEOUT, Limits  # noqa: E402
from hallolive_rt.runtime.session import StreamSession  # noqa: E402
from tests.serve_helpers import running_server, tiny_live  # noqa: E402

PROMPT = "A man in a grey coat says: <S>good evening<E>"


@pytest.fixture(scope="module")
def live():
    return tiny_live()


@pytest.fixture(scope="module")
def addr(live):
    with running_server(live, webrtc=True) as a:
        yield a


def _post(addr: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}/webrtc/offer", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def call(addr, start: dict, *, switch: str | None = None, ack: bool = True, vanish_after: int | None = None,
               timeout: float = 120.0) -> dict:
    """One session as a peer: offer, tracks received until the server's ``close`` event, events recorded."""
    pc = RTCPeerConnection()  # no ICE servers: host candidates on loopback
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    ch = pc.createDataChannel("control")
    got = {"events": [], "video": [], "audio": [], "closed": asyncio.Event()}

    def send(msg):
        ch.send(json.dumps({"v": 1, **msg}))

    @ch.on("open")
    def _open():
        send({"type": "start", **start})

    @ch.on("message")
    def _message(raw):
        ev = json.loads(raw)
        got["events"].append(ev)
        if ev["type"] == "block":
            if vanish_after is not None and ev["index"] >= vanish_after:
                return
            if ack:
                send({"type": "ack", "block": ev["index"]})
            if switch and ev["index"] == 0:
                send({"type": "prompt", "prompt": switch})
        if ev["type"] == "close":
            got["closed"].set()

    async def pull(track, into):
        with np.errstate(all="ignore"):
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                into.append((f.pts, f.to_ndarray(format="rgb24") if track.kind == "video"
                             else f.to_ndarray().reshape(-1)))

    pulls = []

    @pc.on("track")
    def _track(track):
        pulls.append(asyncio.ensure_future(pull(track, got["video" if track.kind == "video" else "audio"])))

    await pc.setLocalDescription(await pc.createOffer())
    status, answer = await asyncio.to_thread(_post, addr, {"sdp": pc.localDescription.sdp, "type": "offer"})
    assert status == 200, answer
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    if vanish_after is not None:  # stop acking and stop answering: the server must drop this peer on its own
        while not any(e["type"] == "block" and e["index"] >= vanish_after for e in got["events"]):
            await asyncio.sleep(0.05)
        got["pc"] = pc
        return got
    await asyncio.wait_for(got["closed"].wait(), timeout)
    await asyncio.sleep(0.5)  # the last packets in flight
    await pc.close()
    for p in pulls:
        p.cancel()
    return got


def _run(coro):
    return asyncio.run(coro)


def _idle(live, timeout=30.0):
    deadline = time.monotonic() + timeout
    while live.stats()["active_sessions"] or [t for t in threading.enumerate() if t.name.startswith("hallolive-")]:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)


def _reference(live, blocks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``hallolive-rt stream`` generates for this prompt and seed: raw frames and audio, no codec."""
    sess = StreamSession(live.c, live.p, blocks=blocks, keep_text_encoder=True, **live.session_options)
    ctx, _ = sess.encode(PROMPT)
    out = list(sess.run(ctx, seed))
    frames = np.concatenate([b.frames for b in out])
    audio = np.concatenate([b.audio for b in out])
    sess.clear()
    return frames, audio


def _pool8(x: np.ndarray) -> np.ndarray:
    h, w, c = x.shape
    return x.reshape(h // 8, 8, w // 8, 8, c).astype(np.float64).mean((1, 3))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_frames_and_sound_are_the_streams_on_one_clock(addr, live):
    got = _run(call(addr, {"prompt": PROMPT, "seed": 0, "blocks": 3}))
    _idle(live)
    types = [e["type"] for e in got["events"]]
    assert types[:2] == ["hello", "started"] and types[-2:] == ["end", "close"], types
    assert got["events"][-1]["code"] == CLOSE_NORMAL
    end = got["events"][-2]
    ref_frames, ref_audio = _reference(live, 3, 0)
    assert end["frames"] == len(ref_frames) and end["samples"] == len(ref_audio)
    # every frame arrives, in order, each one the generated frame within VP8's loss. A random tiny model's
    # frames are noise-like, of which VP8 keeps the coarse picture: full-resolution PSNR is ~16-24 dB, the
    # PSNR of 8x8 means >= 38 dB (measured 41-47; the frame next to it scores 23-28, so a shift is caught).
    # The last frame stays in the receiver's jitter buffer (aiortc releases a frame when the next one begins)
    pts = np.array([p for p, _ in got["video"]], np.int64)
    assert len(got["video"]) == len(ref_frames) - 1, (len(got["video"]), len(ref_frames))
    coarse = [_psnr(_pool8(f), _pool8(r)) for (_, f), r in zip(got["video"], ref_frames)]
    assert min(coarse) >= 38.0, coarse
    shifted = [_psnr(_pool8(f), _pool8(r)) for (_, f), r in zip(got["video"], ref_frames[1:])]
    assert max(shifted) < 34.0, shifted
    assert min(_psnr(f, r) for (_, f), r in zip(got["video"], ref_frames)) >= 12.0
    # video: frame n at n / fps (90 kHz RTP clock, exact); audio: 20 ms Opus frames back to back (48 kHz)
    fps = live.p.fps
    assert np.array_equal(pts - pts[0], np.round(np.arange(len(pts)) * 90000 / fps).astype(np.int64))
    apts = np.array([p for p, _ in got["audio"]], np.int64)
    assert np.all(np.diff(apts) == 960), np.unique(np.diff(apts))
    # both from 0 on their clocks, no gap, no drift; the end: the resampler's and Opus' lookahead and the
    # receiver's buffer keep the last ~100 ms of sound from arriving before the close (measured 100 ms)
    audio_s = (apts[-1] - apts[0] + 960) / 48000
    assert 0 <= len(ref_audio) / live.p.audio.sample_rate - audio_s <= 0.12 + 1 / fps, audio_s
    stats = live.stats()["first_frame_out_s"]
    assert stats["webrtc"]["n"] >= 1 and stats["webrtc"]["p50"] > 0


def test_prompt_switch_on_the_data_channel(addr, live, monkeypatch):
    monkeypatch.setattr(live, "limits", Limits(max_unacked_blocks=1))  # the DiT one block ahead, not the stream
    got = _run(call(addr, {"prompt": PROMPT, "seed": 1, "blocks": 5},
                    switch="The same man smiles and says: <S>thank you<E>"))
    _idle(live)
    kinds = [e["type"] for e in got["events"]]
    assert "prompt_queued" in kinds and "prompt_applied" in kinds, kinds
    applied = next(e for e in got["events"] if e["type"] == "prompt_applied")
    blocks = {e["index"]: e["prompt_id"] for e in got["events"] if e["type"] == "block"}
    assert blocks[applied["from_block"]] == applied["prompt_id"] == 1


def test_bad_offers_are_refused_and_free_the_slot(addr, live):
    assert _post(addr, {"type": "offer"})[0] == 400
    status, ev = _post(addr, {"type": "offer", "sdp": "v=0\r\nnot sdp"})
    assert status == 400 and ev["code"] == "bad_message"
    _idle(live)


def test_the_offer_takes_the_token_and_origin_rules_and_the_page_no_turn_secret(live):
    from hallolive_rt.runtime.serve.webrtc import MAX_SDP_BYTES

    ice = ("stun:stun.example.org:3478", "user:s3cret@turn:turn.example.org:3478")
    with running_server(live, token="a-long-token", webrtc=True, ice_servers=ice) as a:
        with urllib.request.urlopen(f"http://{a}/webrtc", timeout=10) as r:
            assert json.loads(r.read()) == {"webrtc": True, "ice_servers": [ice[0]]}
        assert _post(a, {"type": "offer", "sdp": ""})[0] == 401
        assert _post(a, {"type": "offer", "sdp": ""}, {"Authorization": "Bearer wrong-token"})[0] == 401
        auth = {"Authorization": "Bearer a-long-token"}
        assert _post(a, {"type": "offer", "sdp": ""}, {**auth, "Origin": "https://elsewhere.example"})[0] == 403
        status, ev = _post(a, b"x" * (MAX_SDP_BYTES + 1), auth)
        assert status == 413 and ev["code"] == "too_large"
        status, ev = _post(a, b"{not json", auth)
        assert status == 400 and ev["code"] == "bad_message"
    _idle(live)
    with running_server(live) as a:  # without --webrtc: no offer endpoint, and the page is told so
        with urllib.request.urlopen(f"http://{a}/webrtc", timeout=10) as r:
            assert json.loads(r.read()) == {"webrtc": False, "ice_servers": []}
        assert _post(a, {"type": "offer", "sdp": ""})[0] in (404, 405)


def test_a_vanished_peer_frees_the_slot_within_the_client_timeout(addr, live, monkeypatch):
    monkeypatch.setattr(live, "limits", Limits(client_timeout_s=2.0, max_unacked_blocks=1))

    async def vanish():
        got = await call(addr, {"prompt": PROMPT, "seed": 2, "blocks": None}, vanish_after=0)
        t = time.monotonic()
        while live.stats()["active_sessions"]:
            assert time.monotonic() - t < 2.0 + 10.0, "the slot of a vanished peer was not freed"
            await asyncio.sleep(0.05)
        await got["pc"].close()
        return got

    got = _run(vanish())
    _idle(live)
    codes = [e.get("code") for e in got["events"] if e["type"] in ("error", "close")]
    assert "client_timeout" in codes or CLOSE_TIMEOUT in codes or not codes


def test_ten_sessions_leave_threads_and_memory_flat(addr, live):
    import torch

    def tensors():
        return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())

    counts, threads = [], []
    for i in range(10):
        _run(call(addr, {"prompt": PROMPT, "seed": i, "blocks": 1}))
        _idle(live)  # no session or pipeline thread is left
        gc.collect()
        counts.append(tensors())
        threads.append(len(os.listdir("/proc/self/task")))  # OS threads: codec and event-loop pools included
    assert counts[-1] == counts[2], counts  # no tensor outlives a session
    # native pools (libvpx, Opus, the loop's executor) settle after the first sessions: bounded, not growing
    assert max(threads[2:]) <= min(threads) + 8 and threads[-1] <= max(threads[2:6]) + 2, threads
    assert live.stats()["active_sessions"] == 0


def test_the_first_frame_bench_runs_and_webrtc_sends_its_first_frame_before_the_block_is_muxed(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "serve_first_frame.py"
    spec = importlib.util.spec_from_file_location("serve_first_frame", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ff.json"
    res = bench.main(["--sessions", "1", "--blocks", "2", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == res["summary"]
    ws, rtc = res["summary"]["ws"], res["summary"]["webrtc"]
    assert ws["n"] == rtc["n"] == 1 and res["env"]["git_commit"]
    # the WebSocket's first frame leaves with its block's fragment, WebRTC's once it is decoded
    assert 0 < rtc["server_first_frame_out_s_p50"] < ws["server_first_frame_out_s_p50"]
