"""The WebRTC transport of live sessions (aiortc): ``POST /webrtc/offer`` takes the browser's SDP offer and
answers; the session then streams one video track (VP8 or H.264, as negotiated, the profile's size and
fps) and one audio track (Opus; aiortc resamples the 16 kHz mono to 48 kHz), fed frame by frame as each
latent frame is decoded. Video frame ``n`` has pts ``n`` in time base ``1/fps`` and audio sample ``s`` pts
``s`` in ``1/sample_rate``: the writer's integer clock. The control messages and events of the protocol
travel as JSON text on the client's data channel; the close that ends a WebSocket arrives as a last
``close`` event ``{code, reason}``, then the peer connection closes. The session is the same
``LiveSession`` the WebSocket wraps: flow control by the client's acks (the tracks send in real time, so
acks follow playback), and a peer connection that fails or closes ends the session and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import time
from fractions import Fraction

import numpy as np

from hallolive_rt.options import ice_server

from .control import Control, busy_event, shutdown_event
from .protocol import CLOSE_GOING_AWAY, event
from .sessions import Binary, Close, LiveServer

__all__ = ["WEBRTC_EXTRA_HINT", "webrtc_available", "answer_offer", "MAX_SDP_BYTES"]

log = logging.getLogger("hallolive_rt.serve")

WEBRTC_EXTRA_HINT = "pip install -e '.[webrtc]'  (aiortc, the WebRTC stack of --webrtc)"
MAX_SDP_BYTES = 64 * 1024  # an offer of a few tracks is ~5 KB
AUDIO_FRAME_S = Fraction(1, 50)  # 20 ms audio frames (Opus' packet time)


def webrtc_available() -> bool:
    try:
        return importlib.import_module("aiortc") is not None
    except ImportError:
        return False


class _Track:
    """One outgoing track, fed from any thread, sent in real time: item ``k`` leaves no earlier than
    ``clock.t0 + due(k)``, where ``clock.t0`` is when the peer's first frame (of either track) left."""

    def __init__(self, kind: str, clock: dict, loop: asyncio.AbstractEventLoop, on_item=None):
        from aiortc import MediaStreamTrack

        outer = self

        class Track(MediaStreamTrack):
            async def recv(self):
                return await outer.next()

        Track.kind = kind
        self.track, self.clock, self.loop, self.on_item = Track(), clock, loop, on_item
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent = 0

    def put(self, item) -> None:  # any thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: the peer ended
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self):
        while True:
            item = await self.queue.get()
            if not isinstance(item, tuple):  # (frame, due_s); anything else is a marker for on_item
                self.on_item(item)
                continue
            frame, due = item
            now = time.monotonic()
            t0 = self.clock.setdefault("t0", now)
            if t0 + due > now:
                await asyncio.sleep(t0 + due - now)
            self.sent += 1
            if self.on_item is not None and self.sent == 1:
                self.on_item(None)
            return frame


class _Media:
    """A session's media sink: frames to the video track as they are decoded, each block's audio in 20 ms
    frames to the audio track, then the block's index as a marker: the session learns when it was sent."""

    def __init__(self, peer: "_Peer", profile, loop):
        clock: dict = {}
        self.peer, self.fps, self.sr = peer, Fraction(profile.fps).limit_denominator(1001), profile.audio.sample_rate
        self.video = _Track("video", clock, loop, on_item=self._video_marker)
        self.audio = _Track("audio", clock, loop)
        self.frames_in = self.samples_in = 0
        self._held = np.zeros(0, np.int16)  # audio short of a whole 20 ms frame, carried to the next block

    def frames(self, ready) -> None:  # writer thread, each latent frame
        import av

        for rgb in ready.frames:
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            f.pts, f.time_base = self.frames_in, 1 / self.fps
            self.video.put((f, self.frames_in / self.fps))
            self.frames_in += 1

    def block(self, b) -> None:  # writer thread, once the block is decoded (after its frames)
        import av

        pcm = np.concatenate([self._held, (np.clip(b.audio, -1.0, 1.0) * 32767).astype(np.int16)])
        n = int(self.sr * AUDIO_FRAME_S)
        whole = len(pcm) // n * n
        for i in range(0, whole, n):
            f = av.AudioFrame.from_ndarray(pcm[None, i:i + n], format="s16", layout="mono")
            f.sample_rate, f.pts, f.time_base = self.sr, self.samples_in, Fraction(1, self.sr)
            self.audio.put((f, Fraction(self.samples_in, self.sr)))
            self.samples_in += n
        self._held = pcm[whole:]
        self.video.put(b.index)

    def _video_marker(self, block: int | None) -> None:  # the loop: a frame / a block's last frame went out
        s = self.peer.session
        if s is not None:
            s.frame_out() if block is None else s.sent(block)


class _Peer(Control):
    """One peer connection: its tracks, its data channel (``Control.receive``), its end."""

    transport = "webrtc"

    def __init__(self, server: LiveServer, slot, pc, loop):
        super().__init__(server, slot)
        self.pc, self.loop, self.emit = pc, loop, self._queue
        self.media = _Media(self, server.p, loop)
        self.channel = None
        self._tasks: list[asyncio.Task] = []

    def begin(self) -> None:
        self.emit(self.hello(transport=self.transport))
        self._tasks = [asyncio.ensure_future(self._send_loop()), asyncio.ensure_future(self._start_deadline())]

    def on_channel(self, channel) -> None:
        self.channel = channel
        channel.on("message", self.receive)
        channel.on("close", lambda: self.loop.create_task(self.end("disconnected")))

    async def _start_deadline(self) -> None:
        await asyncio.sleep(self.limits.start_timeout_s)
        if self.session is None and not self.closing:
            self.start_timed_out()

    async def _send_loop(self) -> None:
        while True:
            item = await self.out.get()
            while self.channel is None or self.channel.readyState == "connecting":
                await asyncio.sleep(0.02)
            if self.channel.readyState != "open":
                return
            if isinstance(item, Close):  # a normal end: what the tracks still hold goes out first (bounded)
                deadline = time.monotonic() + 10.0
                while (not self.media.video.queue.empty() or not self.media.audio.queue.empty()) \
                        and time.monotonic() < deadline and self.pc.connectionState == "connected":
                    await asyncio.sleep(0.05)
                self.channel.send(json.dumps(event("close", code=item.code, reason=item.reason)))
                await asyncio.sleep(0.2)  # SCTP hands the last message on before the association closes
                await self.end(item.reason)
                return
            if not isinstance(item, Binary):  # no fMP4 on this transport (the session has a media sink)
                self.channel.send(json.dumps(item))

    def going_away(self) -> None:
        """Server shutdown: the session aborted, the client told, the peer closed."""
        if self.session is not None:
            self.session.abort("server_shutdown")
        with contextlib.suppress(Exception):
            self.channel.send(json.dumps(shutdown_event()))
            self.channel.send(json.dumps(event("close", code=CLOSE_GOING_AWAY, reason="server_shutdown")))
        self.loop.create_task(self.end("server_shutdown"))

    async def end(self, reason: str) -> None:
        """The peer is over (failed, closed, timed out, shut down): session ended, slot freed, pc closed."""
        if self.finished.is_set():
            return
        self.closing = True
        await self.release(reason)
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()


async def answer_offer(server: LiveServer, offer: dict, *, ice_servers=()) -> tuple[int, dict]:
    """``(200, answer)`` or ``(status, error or busy event)``; the caller has checked origin and token.
    ``ice_servers`` are ``--ice-server`` specs (``[USER:CREDENTIAL@]URL``)."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

    if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str) \
            or set(offer) - {"sdp", "type"}:
        return 400, event("error", code="bad_message", fatal=True,
                          message='the body must be {"sdp": "<the offer>", "type": "offer"}')
    if server.shutting_down:
        return 503, shutdown_event()
    slot = server.admit()
    if slot is None:
        return 503, busy_event(server)
    # an explicit empty list: aiortc would otherwise ask a public STUN server; loopback needs host candidates
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[
        RTCIceServer(urls=url, username=user, credential=cred) for url, user, cred in map(ice_server, ice_servers)]))
    peer = _Peer(server, slot, pc, asyncio.get_running_loop())
    server.attach(peer)
    pc.on("datachannel", peer.on_channel)

    @pc.on("connectionstatechange")
    async def _state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await peer.end("disconnected")

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        kinds = sorted(t.kind for t in pc.getTransceivers())
        if kinds != ["audio", "video"] or pc.sctp is None:
            raise ValueError(f"it must receive one audio and one video track and open a data channel; it has "
                             f"{kinds or 'no media'}{'' if pc.sctp is not None else ' and no data channel'}")
        pc.addTrack(peer.media.video.track)
        pc.addTrack(peer.media.audio.track)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as e:  # noqa: BLE001 - any malformed offer: the client is told, the slot is freed
        await peer.end("bad_offer")
        return 400, event("error", code="bad_message", fatal=True, message=f"the offer cannot be answered: {e}")
    peer.begin()
    return 200, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
