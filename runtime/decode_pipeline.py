"""The decode pipeline: the video and audio decoders behind the DiT, on one or two devices, overlapped
(block i decodes while the DiT runs block i's context pass and block i+1). ``submit`` takes a block's
committed latents (video [B, 48, T, h, w], audio [B, 30, tokens]); each latent frame's uint8 pixels go to
``on_frames`` as they reach the host, the whole block to ``on_block`` on the writer thread.
Threads, streams, events and slots: ``docs/ARCHITECTURE.md``."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import torch

from hallolive_rt.model.audio_stream import StreamingAudioDecoder
from hallolive_rt.nvtx import stage
from hallolive_rt.profile import Profile

from .block_jobs import DecodedBlock, FramesReady, _Job, _WriteJob
from .block_marks import BlockMarks
from .clock import Clock
from .placement import DECODE_STREAM_PRIORITY, DIT_STREAM_PRIORITY
from .vae_runner import VideoDecodeOptions, make_video_runner

__all__ = ["DecodedBlock", "DecodePipeline", "FramesReady", "frames_to_uint8", "failing_as"]


@contextlib.contextmanager
def failing_as(name: str):
    """An exception raised inside carries ``failed_stage = name`` (the innermost stage wins), whichever
    thread re-raises it: a live session tells its client which stage ended the stream."""
    try:
        yield
    except BaseException as e:
        if getattr(e, "failed_stage", None) is None:
            with contextlib.suppress(AttributeError, TypeError):  # an exception type without a __dict__
                e.failed_stage = name
        raise


def frames_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output [3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3] (round half to even, on the device)."""
    return ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


_STOP = object()


class DecodePipeline:
    """Decodes committed blocks (video + streamed audio) behind the DiT; see the module docstring."""

    def __init__(self, components, profile: Profile, *, overlap: bool = True, on_block=None, on_frames=None,
                 host_slots: int = 3, video_runner: VideoDecodeOptions | str | None = None):
        c = components
        self.p, self.overlap, self.on_block = profile, overlap, on_block
        self.on_frames = on_frames  # FramesReady -> None, on the writer thread, frame by frame
        self.dit_dev, self.vae_dev = c.dit_device, c.vae_device  # canonical (load_components)
        self.cuda = self.vae_dev.type == "cuda"
        self.clock = Clock([self.dit_dev, self.vae_dev])
        self.vdec = c.video_decoder
        self.adec = StreamingAudioDecoder.from_profile(profile, c.audio_vae, c.vocoder)
        if profile.stream.batch != 1:
            raise ValueError("the streaming session writes one video: profile batch must be 1")
        s, v, a = profile.stream, profile.video, profile.audio
        dt = c.dtype
        fb, na, nf = s.latent_frames_per_block, s.audio_tokens_per_block, s.future_audio_tokens
        dev = self.vae_dev
        # two staging slots: block i decodes from one while block i+1 is copied into the other
        self.st_video = torch.zeros(2, 1, fb, v.latent_channels, v.latent_height, v.latent_width, device=dev, dtype=dt)
        self.st_audio = torch.zeros(2, 1, na, a.latent_channels, device=dev, dtype=dt)
        self.st_future = torch.zeros(2, 1, nf, a.latent_channels, device=dev, dtype=dt)
        self.max_frames = profile.pixel_frames(fb, first_block=False)
        self.samples = na * a.samples_per_token
        self.h_frames = [torch.empty(self.max_frames, profile.pixel_height, profile.pixel_width, 3,
                                     dtype=torch.uint8, pin_memory=self.cuda) for _ in range(host_slots)]
        self.h_audio = [torch.empty(self.samples, dtype=torch.float32, pin_memory=self.cuda)
                        for _ in range(host_slots)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(dev, priority=DECODE_STREAM_PRIORITY)
            self.vae_stream = torch.cuda.Stream(dev, priority=DECODE_STREAM_PRIORITY)
            self._dit_stream = torch.cuda.Stream(self.dit_dev, priority=DIT_STREAM_PRIORITY)
            self._hold_stream = torch.cuda.Stream(self.dit_dev)  # two devices: see submit
            self.slot_free = [torch.cuda.Event() for _ in range(2)]
        if self.vdec.dtype != dt:
            raise ValueError(f"the video decoder holds {self.vdec.dtype} weights, the stream runs {dt}")
        self.vrunner = make_video_runner(self.vdec, video_runner, 1, v.latent_height, v.latent_width)
        with torch.cuda.device(dev) if self.cuda else contextlib.nullcontext():
            self.vrunner.prepare()  # compile / capture now, outside any timed stream
        self.astate = self.adec.new_state(1)
        self._threads: list[threading.Thread] = []
        self._unsealed: list[_Job] = []  # submitted with sealed=False, not yet sealed
        self._decoded: dict[int, _WriteJob] = {}  # sequential mode: decoded, waiting for their seal

    # ---- lifecycle ------------------------------------------------------------------------------
    def reset_states(self) -> None:
        self.vrunner.reset()
        self.astate = self.adec.new_state(1)

    def start(self) -> None:
        """A new stream: fresh decoder states, clocks at zero, worker threads up (overlap mode)."""
        self.close()
        self.reset_states()
        self._free_hslots: queue.Queue = queue.Queue()
        for i in range(len(self.h_frames)):
            self._free_hslots.put(i)
        self._done: queue.Queue = queue.Queue()
        # host-side ownership of the two staging slots: the DiT thread refills slot k only after the
        # decode thread has issued (CUDA: enqueued, and recorded slot_free after) the decode reading it
        self._slot_sem = [threading.Semaphore(1) for _ in range(2)]
        self._submitted = self._returned = 0
        self.clock.start()
        if self.overlap:
            self._decode_q: queue.Queue = queue.Queue()
            self._write_q: queue.Queue = queue.Queue()
            self._threads = [threading.Thread(target=self._loop, args=(self._decode_q, self._decode, self._write_q),
                                              name="hallolive-decode", daemon=True),
                             threading.Thread(target=self._loop, args=(self._write_q, self._write, self._done),
                                              name="hallolive-writer", daemon=True)]
            for t in self._threads:
                t.start()

    def close(self) -> None:
        """Stop the worker threads (after the work already queued); a block never sealed is dropped."""
        for job in self._unsealed:  # the stream ended (an error, a stop) between submit and seal
            job.abandoned = True
            job.sealed.set()
        self._unsealed, self._decoded = [], {}
        if self._threads:
            self._decode_q.put(_STOP)
            for t in self._threads:
                t.join()
            self._threads = []

    def _thread_setup(self) -> None:  # first thing on a worker thread
        if self.cuda:
            torch.cuda.set_device(self.vae_dev)

    def _loop(self, inbox: queue.Queue, fn, outbox: queue.Queue) -> None:
        try:
            self._thread_setup()
            failed = None
        except BaseException as e:  # noqa: BLE001 - every item then fails with it (never a silent dead thread)
            failed = e
        while True:
            item = inbox.get()
            if item is _STOP or isinstance(item, BaseException):
                outbox.put(item)  # pass errors and the stop signal down the line
                if item is _STOP:
                    return
                continue
            if failed is not None:
                self._release(item)  # what the item holds, or the DiT thread would wait for it forever
                outbox.put(failed)
                continue
            try:
                out = fn(item)
                if out is not None:  # None: the decode thread already handed the block to the writer
                    outbox.put(out)
            except BaseException as e:  # surfaced on the main thread by ready()/finish()
                outbox.put(e)

    def _release(self, item) -> None:
        """Give back the staging slot (a decode job) or host slot (a write job) of an item not processed."""
        if isinstance(item, _Job):
            self._slot_sem[item.slot].release()
        elif isinstance(item, _WriteJob):
            self._free_hslots.put(item.hslot)

    def describe(self) -> dict:
        d = {"overlap": self.overlap, "vae": self.vrunner.describe()}
        if self.cuda:
            d["stream_priorities"] = {"dit": self._dit_stream.priority, "decode": self.vae_stream.priority,
                                      "copy": self.copy_stream.priority}
        return d

    # ---- main thread: hand-off --------------------------------------------------------------------
    @contextlib.contextmanager
    def dit_stream(self):
        """Run the enclosed DiT work on the high-priority DiT stream (CUDA; a no-op on CPU), ordered after
        the thread's current stream on entry and before it on exit."""
        if not self.cuda:
            yield
            return
        cur = torch.cuda.current_stream(self.dit_dev)
        s = self._dit_stream
        s.wait_stream(cur)
        try:
            with torch.cuda.stream(s):
                yield
        finally:
            cur.wait_stream(s)

    @torch.no_grad()
    def submit(self, out, marks: BlockMarks, *, sealed: bool = True) -> _Job:
        """Hand block ``out`` (a BlockOutput on the DiT device) to the decoders; returns at once. With
        ``sealed=False`` the DiT still runs its context pass: the block is written once ``seal(job)``."""
        i = out.index
        job = _Job(i, i % 2, i == 0, out.audio_future.shape[1] > 0, marks)
        if sealed:
            job.sealed.set()
        else:
            self._unsealed.append(job)
        slot = job.slot
        self._slot_sem[slot].acquire()
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.dit_dev))
            with torch.cuda.device(self.vae_dev), torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(done)
                self.copy_stream.wait_event(self.slot_free[slot])  # decode of block i-2 has read the slot
                self._stage_copy(out, slot)
                job.copied = torch.cuda.Event()
                job.copied.record(self.copy_stream)
            # the DiT's allocator must not reuse the latents' memory before the copy has read it: on one GPU
            # the copy stream is the DiT device's own; with two, a stream of the DiT device that waits for
            # the copy stands for it (the allocator knows nothing of the other device's streams)
            hold = self.copy_stream
            if self.dit_dev != self.vae_dev:
                hold = self._hold_stream
                hold.wait_event(job.copied)
            for t in (out.video, out.audio, out.audio_future):
                t.record_stream(hold)
        else:
            self._stage_copy(out, slot)
        self._submitted += 1
        if self.overlap:
            self._decode_q.put(job)
        elif job.sealed.is_set():
            self._done.put(self._write(self._decode(job)))
        else:  # sequential: decode now, write when sealed
            self._decoded[job.index] = self._decode(job)
        return job

    def seal(self, job: _Job) -> None:
        """The DiT is done with ``job``'s block and its marks are final (see ``submit``)."""
        self._unsealed.remove(job)
        job.sealed.set()
        w = self._decoded.pop(job.index, None)
        if w is not None:
            try:
                self._done.put(self._write(w))
            except BaseException as e:  # surfaced by ready()/finish(), as from the writer thread
                self._done.put(e)

    def _stage_copy(self, out, slot: int) -> None:
        nb = self.cuda
        self.st_video[slot].copy_(out.video, non_blocking=nb)
        self.st_audio[slot].copy_(out.audio, non_blocking=nb)
        if out.audio_future.shape[1]:
            self.st_future[slot].copy_(out.audio_future, non_blocking=nb)

    # ---- decode (decode thread, or inline) ------------------------------------------------------------
    def _decode(self, job: _Job) -> _WriteJob:
        hslot = self._free_hslots.get()  # back-pressure: waits for the writer to free a host slot
        try:
            if self.cuda:
                with torch.cuda.device(self.vae_dev), torch.cuda.stream(self.vae_stream):
                    self.vae_stream.wait_event(job.copied)
                    return self._decode_on_stream(job, hslot)
            return self._decode_on_stream(job, hslot)
        finally:
            self._slot_sem[job.slot].release()  # after slot_free was recorded (CUDA)

    @torch.no_grad()
    def _decode_on_stream(self, job: _Job, hslot: int) -> _WriteJob | None:
        w = _WriteJob(job, hslot)
        if not self.overlap:
            try:
                self._fill(w)
            except BaseException:
                self._free_hslots.put(hslot)  # a failed decode must not starve the next one of host slots
                raise
            return w
        self._write_q.put(w)  # the writer sends each frame as it arrives; it owns the host slot from here
        try:
            self._fill(w)
        except BaseException as e:
            w.fail(e)
            raise
        return None  # already with the writer

    def _fill(self, w: _WriteJob) -> None:
        job, hslot = w.job, w.hslot
        i, slot, clock = job.index, job.slot, self.clock
        z = self.st_video[slot].transpose(1, 2)  # [B, C, Fb, h, w]
        nb = self.cuda
        marks = w.marks
        marks["vae_start"] = clock.mark()
        off = 0
        with stage("vae/video", block=i), failing_as("vae_video"):
            for j in range(z.shape[2]):
                x = self.vrunner.decode_frame(z[:, :, j:j + 1], job.first_block and j == 0)
                u8 = frames_to_uint8(x[0])  # [n, H, W, 3]
                n = u8.shape[0]
                self.h_frames[hslot][off:off + n].copy_(u8, non_blocking=nb)
                off += n
                w.add_frame(clock.mark(), off)
        w.n_frames = off
        marks["vae_video_end"] = w.frame_marks[-1]
        with stage("vae/audio", block=i), failing_as("vae_audio"):
            fut = self.st_future[slot] if job.has_future else None
            wav = self.adec.step(self.astate, self.st_audio[slot], fut)  # [B, S] float32
            self.h_audio[hslot].copy_(wav[0], non_blocking=nb)
            marks["vae_audio_end"] = clock.mark()
        if self.cuda:
            self.slot_free[slot].record(self.vae_stream)
        w.done()

    # ---- host side (writer thread, or inline) -----------------------------------------------------------
    def _write(self, w: _WriteJob) -> DecodedBlock:
        try:
            return self._write_block(w)
        finally:
            self._free_hslots.put(w.hslot)  # also when writing failed: the decode thread never waits on it

    def _write_block(self, w: _WriteJob) -> DecodedBlock:
        clock, job = self.clock, w.job
        ready, start = [], 0
        for j in range(self.p.stream.latent_frames_per_block):  # each latent frame as soon as it is decoded
            w.wait(lambda j=j: len(w.frame_marks) > j)
            ready.append(clock.at_s(w.frame_marks[j], self.vae_dev))  # waits for its copy to the host
            end_j = w.frame_ends[j]
            if self.on_frames is not None:
                self.on_frames(FramesReady(job.index, j, self.h_frames[w.hslot][start:end_j].numpy().copy(),
                                           ready[-1]))
            start = end_j
        w.wait(lambda: "done" in w.marks)
        job.sealed.wait()  # the DiT's marks of this block are final (writer thread; inline: already set)
        if job.abandoned:
            raise RuntimeError(f"block {job.index} abandoned: the stream ended before its DiT work did")
        end = clock.at_s(w.marks["vae_audio_end"], self.vae_dev)
        dm = job.marks
        # the DiT's last mark of the block (after its context pass) may not be reached yet when the decode
        # is done: CUDA's elapsed_time refuses an event not yet completed, so ``times`` waits for it (the
        # writer thread or, sequential, seal); every earlier DiT mark is on the same stream
        times = {
            **dm.times(clock),
            "vae_video": clock.ms(w.marks["vae_start"], w.marks["vae_video_end"]),
            "vae_audio": clock.ms(w.marks["vae_video_end"], w.marks["vae_audio_end"]),
        }
        db = DecodedBlock(job.index, self.h_frames[w.hslot][:w.n_frames].numpy().copy(),
                          self.h_audio[w.hslot].numpy().copy(), times,
                          start_s=clock.at_s(dm.dit_start, self.dit_dev), first_frame_s=ready[0],
                          done_s=max(ready[-1], end), frame_ready_s=ready)
        if self.on_block is not None:
            t = time.perf_counter()
            with stage("io/write", block=job.index):
                self.on_block(db)
            db.times["io_write"] = (time.perf_counter() - t) * 1e3
        return db

    # ---- results (main thread) -------------------------------------------------------------------------
    def _take(self, block: bool) -> list[DecodedBlock]:
        out = []
        while self._returned < self._submitted:
            try:
                item = self._done.get(block=block)
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                self.close()
                raise item
            if item is _STOP:
                continue
            self._returned += 1
            out.append(item)
            block = block and self._returned < self._submitted
        return out

    def ready(self) -> list[DecodedBlock]:
        """Blocks finished so far, in order (never waits)."""
        return self._take(block=False)

    def finish(self) -> list[DecodedBlock]:
        """Wait for every submitted block; stops the worker threads."""
        if self._unsealed:
            raise RuntimeError(f"blocks {[j.index for j in self._unsealed]} were submitted unsealed and never "
                               f"sealed")
        out = self._take(block=True)
        self.close()
        return out
