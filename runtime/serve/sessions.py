"""Live sessions without any web framework: ``LiveServer`` owns the loaded components, the session slots
and the counters; ``LiveSession`` runs one client's stream on its own thread and hands events and fMP4
bytes (or decoded frames and audio, to a ``media`` sink) to a thread-safe ``emit``. Threads, flow
control and endings: ``docs/ARCHITECTURE.md``."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from typing import Callable

from hallolive_rt.cache_policy import ENDLESS
from hallolive_rt.model.text_tokenizer import PromptError
from hallolive_rt.options import DecoderOptions, DiTOptions

from ..media import FragmentSink, StreamWriter
from ..session import StreamSession
from .faults import Watchdog, failing_as, internal_error, stage_of
from .parts import Binary, BlockPace, Close, ServerObserver, Slot as _Slot, Stats as _Stats, cap_malloc_arenas
from .protocol import (CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_TIMEOUT, Limits, ProtocolError, Start, event,
                       mse_mime)

__all__ = ["LiveServer", "LiveSession", "ServerObserver", "Binary", "Close"]

log = logging.getLogger("hallolive_rt.serve")


class LiveServer:
    """The components of one process (or Ray replica), its slots and counters. ``replicas``: servers sharing
    the endpoint (a Ray deployment sets it), told in ``hello`` and ``busy``; ``observer``: a ``ServerObserver``."""

    def __init__(self, components, *, max_sessions: int = 1, limits: Limits | None = None,
                 replica_id: str | None = None, dit: DiTOptions | None = None,
                 decoders: DecoderOptions | None = None, prebuild: bool = True):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if components.text_encoder is None:
            raise ValueError("live sessions encode prompts as they come: load the components with the text encoder")
        cap_malloc_arenas()
        self.c, self.p = components, components.profile
        self.max_sessions, self.limits = max_sessions, limits or Limits()
        self.replica_id = replica_id or uuid.uuid4().hex[:8]
        self.session_options = {"dit": dit or DiTOptions(), "decoders": decoders or DecoderOptions()}
        self._lock = threading.Lock()
        self._free = [_Slot(i) for i in range(max_sessions)]
        self._active: dict[str, LiveSession] = {}
        self._ids = itertools.count(1)
        self._stats = _Stats()
        self.replicas = 1
        self.observer: ServerObserver | None = None
        self.shutting_down = False  # begin_shutdown: no new session from then on
        self._connections: set = set()  # what begin_shutdown hands back to be closed (app.py's connections)
        if prebuild:  # the default shape (endless, the preset's lookahead) of every slot, before any client:
            for slot in self._free:  # state allocated (an OOM shows now) and graphs captured while nothing runs
                self.session_for(slot, None, None)
        self.watchdog = Watchdog(self)

    # ---- admission ------------------------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        return self.max_sessions - len(self._free)

    def admit(self) -> _Slot | None:
        """A free slot, or None (the caller answers ``busy``)."""
        with self._lock:
            slot = self._free.pop() if self._free and not self.shutting_down else None
            active = self.active_sessions
        if slot is not None:
            self._observe("sessions", active)
        return slot

    def release(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)
            active = self.active_sessions
        self._observe("sessions", active)

    def _observe(self, what: str, *args) -> None:
        """Tell the observer; its failure is logged, never a session's or a slot's."""
        if self.observer is not None:
            try:
                getattr(self.observer, what)(*args)
            except Exception:  # noqa: BLE001
                log.exception("the server observer failed (%s)", what)

    # ---- connections and shutdown ---------------------------------------------------------------
    def attach(self, conn) -> None:
        with self._lock:
            self._connections.add(conn)

    def detach(self, conn) -> None:
        with self._lock:
            self._connections.discard(conn)

    def running(self) -> list["LiveSession"]:
        with self._lock:
            return list(self._active.values())

    def begin_shutdown(self) -> list:
        """No new session from now on, every running one aborted; returns the connections to tell and close."""
        with self._lock:
            self.shutting_down = True
            sessions, conns = list(self._active.values()), list(self._connections)
        for s in sessions:
            s.abort("server_shutdown")
        return conns

    def open_session(self, slot: _Slot, start: Start, emit: Callable[[object], None], *, media=None,
                     transport: str = "ws") -> "LiveSession":
        """Start one client's stream in ``slot`` (its thread starts now; it owns the slot, freed before its last
        Close). ``media``: ``frames(FramesReady)`` and ``block(DecodedBlock)`` (writer thread) instead of fMP4."""
        sid = f"{self.replica_id}-{next(self._ids)}"
        s = LiveSession(self, slot, sid, start, emit, media=media, transport=transport)
        with self._lock:
            self._active[sid] = s
            self._stats.sessions_total += 1
        s._thread.start()
        return s

    def _ended(self, s: "LiveSession") -> None:
        with self._lock:
            self._active.pop(s.id, None)
            self._stats.ended[s.end_reason] += 1
        self._observe("ended", s.end_reason)

    def _served(self, block_s: float, ttff_s: float | None) -> None:
        """A block went out (``ttff_s`` with a session's first): counted now: an endless session's stats move."""
        with self._lock:
            self._stats.record_block(block_s, ttff_s)
        if ttff_s is not None:
            self._observe("first_block", ttff_s)
        self._observe("block", block_s)

    def _first_out(self, transport: str, seconds: float) -> None:
        with self._lock:
            self._stats.record_first_out(transport, seconds)

    def check_prompt(self, text: str) -> None:
        try:
            info = self.c.tokenizer(text)
        except (PromptError, UnicodeError) as e:  # UnicodeError: text the tokenizer cannot encode
            raise ProtocolError("bad_prompt", f"the prompt cannot be tokenized: {e}") from None
        if info.truncated:
            raise ProtocolError("bad_prompt", "prompt too long: " + "; ".join(info.truncation_messages()))

    def session_for(self, slot: _Slot, blocks: int | None, future: int | None) -> StreamSession:
        """The slot's StreamSession for this stream shape (built once; rebuilt when the shape changes: with
        a capturing backend and several slots, that capture runs while other slots stream, untested on GPU)."""
        key = (blocks, future)
        if slot.session is None or slot.key != key:
            slot.session = None  # drop the old state before allocating the new one
            slot.session = StreamSession(self.c, self.p, blocks=ENDLESS if blocks is None else blocks,
                                         future_audio_tokens=future, keep_text_encoder=True,
                                         **self.session_options)
            slot.key = key
        return slot.session

    # ---- what the client and the operator see ---------------------------------------------------------
    def info(self) -> dict:
        """What a client is told of the stream (``hello``'s ``profile``): size, rates, block length, device."""
        p = self.p
        return {"preset": p.name, "width": p.pixel_width, "height": p.pixel_height, "fps": float(p.fps),
                "sample_rate": p.audio.sample_rate, "clip_blocks": p.stream.blocks,
                "frames_per_block": p.pixel_frames(p.stream.latent_frames_per_block, first_block=False),
                "text_len": p.text.text_len, "device": str(self.c.dit_device), "weights": self.c.source}

    def stats(self) -> dict:
        """Health and metrics of this process / replica (``/health``)."""
        with self._lock:
            stuck = sum(s.end_reason == "stalled" for s in self._active.values())  # threads not yet returned
            return {"replica": self.replica_id, "replicas": self.replicas, "active_sessions": self.active_sessions,
                    "max_sessions": self.max_sessions, "stuck_sessions": stuck, **self._stats.summary()}


class LiveSession:
    """One client's stream: a thread running the StreamSession, flow control, prompt switches, the end."""

    def __init__(self, server: LiveServer, slot: _Slot, sid: str, start: Start, emit: Callable[[object], None],
                 *, media=None, transport: str = "ws"):
        self.server, self.slot, self.id, self.start, self._emit = server, slot, sid, start, emit
        self.media, self.transport, self.limits = media, transport, server.limits
        self.first_out_s: float | None = None  # start to the first frame leaving the server
        self._media_frames = self._media_samples = 0
        self._cond = threading.Condition()
        self._aborted = self._stopping = False
        self.end_reason = "running"
        self.produced = self._acked = self._sent = 0  # blocks emitted / acknowledged (0..n) / sent
        self._prompt_ids = itertools.count(1)
        self._pending_prompts = 0
        self._early: list[tuple[int, str]] = []  # switches asked for before the StreamSession exists
        self._applied: list[tuple[int, int]] = []  # (from_block, prompt_id), in order
        self._sess: StreamSession | None = None
        self._thread = threading.Thread(target=self._work, name=f"hallolive-session-{sid}", daemon=True)
        self.t0 = time.perf_counter()
        self.ttff_s: float | None = None
        self.pace = BlockPace()
        self._writer: StreamWriter | None = None
        self._final_close: Close | None = None  # emitted once the slot is free again
        self._closed = False  # the close went out (the watchdog sends it at once: the thread may be stuck)
        self._progress_at = time.monotonic()  # the last block (or the start): what the watchdog measures
        self._waiting = False  # on the client (flow control): not a stall

    # ---- from the connection (event-loop thread) -------------------------------------------------
    def switch_prompt(self, text: str) -> int:
        """Queue a prompt for the next block boundary; returns its id. ProtocolError if refused."""
        self.server.check_prompt(text)
        with self._cond:
            if self._stopping or self._aborted:
                raise ProtocolError("not_running", "the session is ending: no more prompt switches")
            if self._pending_prompts >= self.limits.max_pending_prompts:
                raise ProtocolError("too_many_prompts", f"{self._pending_prompts} prompt switches are already "
                                                        f"waiting for a block boundary; wait for prompt_applied")
            pid = next(self._prompt_ids)
            self._pending_prompts += 1
            if self._sess is None:
                self._early.append((pid, text))
            else:
                self._queue_switch(pid, text)
        self._emit(event("prompt_queued", prompt_id=pid))
        return pid

    def _queue_switch(self, pid: int, text: str) -> None:  # under self._cond
        def applied(block: int) -> None:
            with self._cond:
                self._pending_prompts -= 1
                self._applied.append((block, pid))
            self._emit(event("prompt_applied", prompt_id=pid, from_block=block))

        self._sess.switch_prompt(text, on_applied=applied)

    def ack(self, block: int) -> None:
        with self._cond:
            self._acked = max(self._acked, block + 1)
            self._cond.notify_all()

    def sent(self, block: int) -> None:
        """The connection wrote block ``block``'s fragment (or its track sent the block's last frame)."""
        self.frame_out()
        with self._cond:
            self._sent = max(self._sent, block + 1)
            self._cond.notify_all()

    def frame_out(self) -> None:
        """A frame left the server: the first one is the transport's time to first frame."""
        if self.first_out_s is None:
            self.first_out_s = time.perf_counter() - self.t0
            self.server._first_out(self.transport, self.first_out_s)

    def stop(self) -> None:
        """Graceful: end after the block running now; the blocks made so far, the tail and ``end`` follow."""
        with self._cond:
            self._stopping = True
            sess = self._sess
        if sess is not None:
            sess.request_stop()

    def abort(self, reason: str) -> None:
        """Disconnect, timeout, error: stop at once, emit nothing more."""
        with self._cond:
            if not self._aborted:
                self._aborted = True
                self.end_reason = reason if self.end_reason == "running" else self.end_reason
            self._cond.notify_all()
            sess = self._sess
        if sess is not None:
            sess.request_stop()

    def check_stall(self, now: float) -> None:
        """Watchdog thread: no block for ``block_timeout_s`` (waits for the client excluded) ends the session:
        its client gets ``stalled`` and the close now; the slot comes back when the thread returns."""
        with self._cond:
            idle = now - self._progress_at
            if self._aborted or self._waiting or idle <= self.limits.block_timeout_s or not self._thread.is_alive():
                return
            self._aborted, self.end_reason, self._closed = True, "stalled", True
            self._cond.notify_all()
            sess = self._sess
        log.error("session %s: no block for %.1f s (block_timeout_s %g): ended as stalled", self.id, idle,
                  self.limits.block_timeout_s)
        self._emit(event("error", code="stalled", fatal=True,
                         message=f"no block for {idle:.1f} s (block_timeout_s {self.limits.block_timeout_s:g}): "
                                 f"the session was ended; start a new one"))
        self._emit(Close(CLOSE_INTERNAL, "stalled"))
        if sess is not None:
            sess.request_stop()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def emit(self, item) -> None:
        if not self._aborted:
            self._emit(item)

    # ---- the session thread -----------------------------------------------------------------------
    def _work(self) -> None:
        st, p = self.start, self.server.p
        sess = None
        try:
            with failing_as("setup"):
                sess = self.server.session_for(self.slot, st.blocks, st.future_audio_frames)
            with failing_as("text"):
                ctx, _ = sess.encode(st.prompt)  # checked by LiveServer.check_prompt before the session opened
            if self.media is None:
                with failing_as("writer"):
                    self._writer = StreamWriter(None, width=p.pixel_width, height=p.pixel_height, fps=p.fps,
                                                sample_rate=p.audio.sample_rate, sink=FragmentSink())
            else:
                sess.pipeline.on_frames = self.media.frames
            sess.pipeline.on_block = self._on_block
            with self._cond:
                self._sess = sess
                for pid, text in self._early:
                    self._queue_switch(pid, text)
                self._early = []
                stop_now = self._stopping or self._aborted
            self.emit(event("started", session=self.id, replica=self.server.replica_id, prompt_id=0, seed=st.seed,
                            blocks=st.blocks, future_audio_frames=sess.p.stream.future_audio_tokens,
                            policy=sess.policy.name, encode_s=sess.text_encode_s))
            run = sess.run(ctx, st.seed)
            if stop_now:
                sess.request_stop()  # after run(): it clears older stops
            for _ in run:  # blocks go out from _on_block (writer thread); this loop drives the DiT
                if self._aborted or self._stopping:
                    sess.request_stop()
                    if self._aborted:
                        break
            run.close()
            with failing_as("writer"):
                self._finish()
        except Exception as e:  # noqa: BLE001 - reported to the client, logged with its traceback
            stage = stage_of(e, "dit")  # untagged: raised on this thread, by the DiT's block loop
            log.exception("session %s failed in %s", self.id, stage)
            with self._cond:
                self.end_reason = "error" if self.end_reason == "running" else self.end_reason
            self.emit(internal_error(e, stage))
            self._final_close = Close(CLOSE_INTERNAL, "internal")
        finally:
            self._teardown(sess)

    def _teardown(self, sess: StreamSession | None) -> None:
        """Nothing of the stream outlives it (a state that cannot be zeroed is dropped), the slot is freed, then
        the close goes out (a client that reconnects at once finds the slot free)."""
        if sess is not None:
            sess.pipeline.on_block = sess.pipeline.on_frames = None
            try:
                sess.clear()
            except Exception:  # noqa: BLE001
                log.exception("session %s: its state could not be zeroed: the slot will build a new one", self.id)
                self.slot.session = self.slot.key = None
        with self._cond:
            self._sess = None
        if self._writer is not None:
            try:
                self._writer.close()  # idempotent; frees the encoders (an aborted stream's bytes go nowhere)
            except Exception as e:  # noqa: BLE001 - a writer that failed mid-stream may fail again here
                log.warning("session %s: closing its writer failed too: %s: %s", self.id, type(e).__name__, e)
        self.server._ended(self)
        self.server.release(self.slot)
        with self._cond:
            close, self._closed = (None if self._closed else self._final_close), True
        if close is not None:
            self._emit(close)

    def _finish(self) -> None:
        with self._cond:
            if self._aborted:
                return
            self.end_reason = "stopped" if self._stopping else "done"
        if self._writer is None:  # media sink: what was generated, no held frames
            summary = {"frames": self._media_frames, "samples": self._media_samples,
                       "video_s": self._media_frames / float(self.server.p.fps),
                       "audio_s": self._media_samples / self.server.p.audio.sample_rate}
        else:
            summary = self._writer.close()
            for seg in self._writer.sink.pop():
                self.emit(event("tail", bytes=len(seg.data)))
                self.emit(Binary(seg.data))
        self.emit(event("end", reason=self.end_reason, blocks=self.produced, frames=summary.get("frames", 0),
                        samples=summary.get("samples", 0), video_s=summary.get("video_s", 0.0),
                        audio_s=summary.get("audio_s", 0.0), duration_s=time.perf_counter() - self.t0,
                        first_frame_out_s=self.first_out_s))
        self._final_close = Close(CLOSE_NORMAL, self.end_reason)

    def _on_block(self, b) -> None:
        """Writer thread: mux the block, emit it, then wait for the client (flow control)."""
        if self._aborted or b.index != self.produced:  # an earlier block failed (its error is on its way):
            return  # a stream never skips a block
        with failing_as("writer"):
            if self.media is None:
                self._writer.write_block(b.frames, b.audio)
            else:
                self.media.block(b)
                self._media_frames, self._media_samples = (self._media_frames + b.frames.shape[0],
                                                           self._media_samples + b.audio.shape[0])
        self.ttff_s = time.perf_counter() - self.t0 if self.ttff_s is None else self.ttff_s
        gap, fps = self.pace.add(b)
        block_s = b.done_s - b.start_s
        with self._cond:
            while len(self._applied) > 1 and self._applied[1][0] <= b.index:  # blocks come in order: older go
                self._applied.pop(0)
            pid = self._applied[0][1] if self._applied and self._applied[0][0] <= b.index else 0
            self.produced, self._progress_at = self.produced + 1, time.monotonic()
            queue = self.produced - min(self._acked, self._sent)
        self.server._served(block_s, self.ttff_s if self.produced == 1 else None)
        info = dict(index=b.index, prompt_id=pid, frames=int(b.frames.shape[0]), samples=int(b.audio.shape[0]),
                    ttff_s=self.ttff_s, first_frame_s=b.first_frame_s, block_s=block_s, gap_s=gap, fps=fps,
                    queue=queue, stage_ms={k: round(v, 3) for k, v in b.times.items()})
        if self.media is not None:  # the pictures and sound went to the media sink
            self.emit(event("block", bytes=0, **info))
        with failing_as("writer"):
            for seg in self._writer.sink.pop() if self._writer is not None else ():
                if seg.kind == "init":
                    self.emit(event("init", mime=mse_mime(seg.data), bytes=len(seg.data)))
                    self.emit(Binary(seg.data))
                else:
                    self.emit(event("block", bytes=len(seg.data), **info))
                    self.emit(Binary(seg.data, block=b.index))
        with self._cond:
            self._waiting = True
            ok = self._cond.wait_for(lambda: self._aborted or self.produced - min(self._acked, self._sent)
                                     < self.limits.max_unacked_blocks, timeout=self.limits.client_timeout_s)
            self._waiting, self._progress_at = False, time.monotonic()
        if not ok:
            log.info("session %s: no ack for %.1f s, dropping the client", self.id, self.limits.client_timeout_s)
            self._emit(event("error", code="client_timeout", fatal=True,
                             message=f"no ack for {self.limits.client_timeout_s:g} s with "
                                     f"{self.limits.max_unacked_blocks} blocks unacknowledged"))
            self._final_close = Close(CLOSE_TIMEOUT, "client_timeout")
            self.abort("client_timeout")
