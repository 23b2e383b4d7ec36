"""Streamed media output, block by block: ``StreamWriter`` muxes uint8 RGB frames [N, H, W, 3] and mono
float audio [S] into a fragmented MP4 (H.264 + AAC, one fragment per block), into memory through a
``FragmentSink`` (live sessions), and into raw .y4m / .wav records, every timestamp from two integer
counters; sync rules, kill safety and write failures: ``docs/ARCHITECTURE.md``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import sys
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np

from hallolive_rt.errors import MediaError, OutputWriteError

from .outputs import FileSink, check_writable
from .probe import probe_media
from .raw_records import _WavWriter, _Y4mWriter

__all__ = ["StreamWriter", "MediaError", "OutputWriteError", "SyncPoint", "probe_media", "FragmentSink", "Segment"]

log = logging.getLogger(__name__)
TIMELINE_KEEP = 64  # sync points kept: a failed write cuts back at most 2 blocks


@dataclass(frozen=True)
class SyncPoint:
    """Exact clock state after a block: totals received (not what was muxed) and their end times."""

    block: int
    frames: int
    samples: int
    video_end: Fraction  # frames / fps  (seconds)
    audio_end: Fraction  # samples / sample_rate

    @property
    def audio_lead_s(self) -> float:
        """How far the received audio extends past the received video (negative: video ahead)."""
        return float(self.audio_end - self.video_end)


@dataclass(frozen=True)
class Segment:
    """A piece of the fragmented MP4 as the muxer wrote it: ``init`` (ftyp + moov), ``fragment`` (the moof +
    mdat of block ``block``) or ``tail`` (what close() writes: held frames, tail audio, mfra)."""

    kind: str
    block: int | None
    data: bytes


class FragmentSink:
    """A write-only, in-memory output for StreamWriter's MP4: the writer cuts the bytes into a ``Segment``
    after the header, each block's fragment flush and close; ``pop()`` takes the segments cut since the last
    call. Without the explicit flush a block's segment holds the previous block's fragment."""

    def __init__(self):
        self._buf = bytearray()
        self._segments: list[Segment] = []
        self.bytes_written = 0

    def write(self, data) -> int:
        self._buf += data
        self.bytes_written += len(data)
        return len(data)

    def cut(self, kind: str, block: int | None = None) -> None:
        self._segments.append(Segment(kind, block, bytes(self._buf)))
        self._buf.clear()

    def pop(self) -> list[Segment]:
        out, self._segments = self._segments, []
        return out


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _flush_fragment(container) -> bool:
    """Write the muxer's pending fragment now (libavformat ``av_write_frame(ctx, NULL)``, which PyAV does not
    expose): the AVFormatContext pointer is the first C field of PyAV's Container, read through
    /proc/self/mem and accepted only if it leads to an mp4 AVFormatContext; otherwise False (fragments are
    then cut one keyframe late). Why and how: ``docs/ARCHITECTURE.md``, "The media writer"."""
    vp = ctypes.sizeof(ctypes.c_void_p)
    offset = object.__basicsize__ + vp
    if not isinstance(container, av.container.OutputContainer) or type(container).__basicsize__ < offset + vp:
        return False
    try:
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            def peek(addr: int, n: int) -> bytes:
                mem.seek(addr)
                return mem.read(n)

            def pointer(addr: int) -> int:
                return int.from_bytes(peek(addr, vp), sys.byteorder) if addr else 0

            ctx = pointer(id(container) + offset)
            cls = pointer(ctx)  # ctx->av_class; AVClass starts with class_name
            ofmt = pointer(ctx + 2 * vp) if ctx else 0  # ctx->oformat (after iformat)
            if not (cls and ofmt and peek(pointer(cls), 16) == b"AVFormatContext\0"
                    and peek(pointer(ofmt), 4) == b"mp4\0"):
                return False
        lib = _libavformat()
        if lib.av_interleaved_write_frame(ctx, None) < 0:  # drain the interleaving queue
            return False
        return lib.av_write_frame(ctx, None) >= 0  # mov muxer: close + write the fragment
    except (OSError, ValueError, OverflowError):
        return False


@lru_cache(maxsize=None)
def _libavformat():
    """The libavformat already mapped into this process by PyAV (same handle, same ABI)."""
    with open("/proc/self/maps") as fh:  # Linux; elsewhere the OSError means "no explicit flush"
        paths = [line[line.index("/"):].strip() for line in fh if "libavformat" in line and "/" in line]
    if not paths:
        raise OSError("libavformat is not mapped")
    lib = ctypes.CDLL(paths[0])
    for fn in (lib.av_write_frame, lib.av_interleaved_write_frame):
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return lib


def _close_quietly(*writers) -> None:
    for w in writers:
        if w is not None:
            with contextlib.suppress(av.FFmpegError, OSError):
                w.close()


class StreamWriter:
    """Write streamed blocks of RGB frames + mono float audio to fragmented MP4 / .y4m / .wav: a context
    manager, ``write_block`` once per decoded block. Outputs open at the first block: an error before it
    leaves no files."""

    def __init__(self, path: Path | None, *, width: int, height: int, fps: float | Fraction,
                 sample_rate: int, frames_out: Path | None = None, wav_out: Path | None = None,
                 crf: int = 18, preset: str = "veryfast", audio_bitrate: int = 64_000,
                 sink: FragmentSink | None = None):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise MediaError(f"frame size {width}x{height} must be positive and even (yuv420p)")
        if sample_rate <= 0 or fps <= 0:
            raise MediaError(f"fps ({fps}) and sample_rate ({sample_rate}) must be positive")
        self.path = None if path is None else check_writable(path, "video")
        self.frames_out = None if frames_out is None else check_writable(frames_out, "frames")
        self.wav_out = None if wav_out is None else check_writable(wav_out, "wav")
        if path is not None and sink is not None:
            raise MediaError("the MP4 goes to a path or to a sink, not both")
        self.sink = sink  # the MP4 into memory instead of ``path`` (same encoders, same muxer, same bytes)
        if self.path is None and self.sink is None and self.frames_out is None and self.wav_out is None:
            raise MediaError("StreamWriter needs at least one of path, sink, frames_out, wav_out")
        self.width, self.height, self.sample_rate = width, height, sample_rate
        # 25.0 -> 25, 24000/1001 stays exact; a float like 29.97 becomes 2997/100, still exact.
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.crf, self.preset, self.audio_bitrate = crf, preset, audio_bitrate
        # the sync points of the latest blocks (an endless stream keeps a bounded number)
        self.timeline: deque[SyncPoint] = deque(maxlen=TIMELINE_KEEP)
        self.blocks = 0  # blocks written
        self.summary: dict = {}
        self.fragment_flush = False  # True once an explicit per-block fragment flush succeeded
        self._frames = 0  # received video frames (= muxed, until the hold at close)
        self._samples = 0  # received audio samples
        self._fed = 0  # audio samples given to the AAC encoder
        self._pending = np.zeros(0, np.float32)  # received audio not yet encoded: [S - fed]
        self._last: np.ndarray | None = None  # last frame, [H, W, 3]: held at close
        self._mp4 = self._vs = self._as = self._y4m = self._wav = self._sink = None
        self._mp4_whole = 0  # blocks whose MP4 fragments are entirely on disk (what a rollback keeps)
        self._closed = False
        self.error: OutputWriteError | None = None  # set when a write failed (the outputs were cut back)

    # ---- clocks (integers only) ---------------------------------------------------------------
    def _samples_until_frame(self, n: int) -> int:
        """floor(n * sample_rate / fps): audio that ends at or before the end of frame n-1."""
        return n * self.sample_rate * self.fps.denominator // self.fps.numerator

    def _frames_covering_samples(self, s: int) -> int:
        """ceil(s * fps / sample_rate): frames needed for the video to last at least as long as s."""
        num, den = s * self.fps.numerator, self.sample_rate * self.fps.denominator
        return -(-num // den)

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self.blocks:
            self._abort()  # nothing finished: leave no partial files
        else:
            self.close()  # finished blocks stay playable even if the caller failed later
        return False

    def _open(self):
        try:
            if self.frames_out is not None:
                self._y4m = _Y4mWriter(self.frames_out, self.width, self.height, self.fps)
            if self.wav_out is not None:
                self._wav = _WavWriter(self.wav_out, self.sample_rate)
            if self.path is not None or self.sink is not None:
                self._open_mp4()
        except Exception as e:
            self._abort()
            err = OutputWriteError if isinstance(e, OSError) else MediaError  # e.g. a full disk: nothing kept
            raise err(f"cannot open media outputs ({self.path}, {self.frames_out}, {self.wav_out}): {e}; "
                      f"nothing was written") from e

    def _open_mp4(self):
        opts = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}
        if self.sink is not None:  # in memory (live sessions): nothing to cut back, no file
            target = self.sink
        else:
            self._sink = target = FileSink(self.path)  # the muxer writes through it: a failure can be cut back
        self._mp4 = av.open(target, "w", format="mp4", options=opts)
        vs = self._mp4.add_stream("libx264", rate=self.fps)
        vs.width, vs.height, vs.pix_fmt = self.width, self.height, "yuv420p"
        vs.codec_context.time_base = 1 / self.fps
        # zerolatency: no B-frames / lookahead, so every frame's packet leaves the encoder at once;
        # keyframes only where we force them (block starts), so fragment == block.
        vs.options = {"preset": self.preset, "crf": str(self.crf), "tune": "zerolatency",
                      "forced-idr": "1", "x264-params": "scenecut=0:keyint=infinite"}
        aus = self._mp4.add_stream("aac", rate=self.sample_rate)
        aus.layout, aus.bit_rate = "mono", self.audio_bitrate
        aus.codec_context.time_base = Fraction(1, self.sample_rate)
        self._mp4.start_encoding()  # opens both encoders: frame_size is known from here on
        self._vs, self._as = vs, aus
        if self.sink is not None:
            self.sink.cut("init")  # ftyp + moov (empty_moov: written with the header)

    def _abort(self):
        for w in (self._y4m, self._wav):
            if w is not None:
                w.close()
        _close_quietly(self._mp4)
        if self._sink is not None:
            self._sink.close()
        for p, w in ((self.frames_out, self._y4m), (self.wav_out, self._wav), (self.path, self._sink)):
            if w is not None and p is not None:
                p.unlink(missing_ok=True)
        self._mp4 = self._y4m = self._wav = self._sink = None
        self._closed = True

    # ---- writing ------------------------------------------------------------------------------
    def write_block(self, frames, audio) -> SyncPoint:
        """Append one block: ``frames`` uint8 [N, H, W, 3] RGB, ``audio`` float32 [S] in [-1, 1]."""
        if self._closed:
            raise MediaError("write_block after close")
        frames, audio = _as_numpy(frames), _as_numpy(audio)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise MediaError(f"frames must be uint8 [N, {self.height}, {self.width}, 3], "
                             f"got {frames.dtype} {list(frames.shape)}")
        audio = audio.reshape(-1) if audio.ndim == 2 and 1 in audio.shape else audio
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise MediaError(f"audio must be float [S] (mono), got {audio.dtype} {list(audio.shape)}")
        audio = np.clip(audio.astype(np.float32), -1.0, 1.0)
        if not self.blocks:
            self._open()
        frames = np.ascontiguousarray(frames)
        try:
            self._write_outputs(frames, audio)
        except OSError as e:  # disk full, quota, I/O error: keep what is whole, say so
            raise self._write_failed(e) from None
        self._frames += len(frames)
        if len(frames):
            self._last = frames[-1]
        point = SyncPoint(self.blocks, self._frames, self._samples,
                          Fraction(self._frames) / self.fps, Fraction(self._samples, self.sample_rate))
        self.timeline.append(point)
        self.blocks += 1
        return point

    def _write_outputs(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """One block into every output; each output is committed (whole up to here) once it all landed."""
        if self._sink is not None and not self.fragment_flush:
            # no explicit flush: the muxer writes block i-1's fragment when block i's first frame arrives,
            # so before this block's frames the file ends after block i-2's fragment
            self._sink.commit()
            self._mp4_whole = max(self.blocks - 1, 0)
        if self._y4m is not None:
            self._y4m.write(frames)
        if self._wav is not None:
            self._wav.write(audio)
        self._pending = np.concatenate([self._pending, audio])
        self._samples += audio.shape[0]
        if self._mp4 is not None:
            for i, rgb in enumerate(frames):
                self._encode_frame(rgb, self._frames + i, force_key=(i == 0))
            self._encode_audio(limit=self._samples_until_frame(self._frames + len(frames)))
            self.fragment_flush = _flush_fragment(self._mp4)
            if self._sink is not None:
                if self._sink.error is not None:  # the flush reports failure as False: the sink kept the error
                    raise self._sink.error
                if self.fragment_flush:  # this block's fragment is on disk
                    self._sink.commit()
                    self._mp4_whole = self.blocks + 1
            if self.sink is not None:
                self.sink.cut("fragment", self.blocks)
        for w in (self._y4m, self._wav):
            if w is not None:
                w.commit()

    def _write_failed(self, err: OSError) -> OutputWriteError:
        """Cut every output back to its last complete block and close it; the error says what was kept."""
        kept = self.blocks if self._sink is None else min(self.blocks, self._mp4_whole)
        what = "the disk is full" if err.errno == errno.ENOSPC else (
            "the disk quota is exceeded" if err.errno == errno.EDQUOT else f"a write failed ({err})")
        where = ", ".join(str(p) for p in (self.path, self.frames_out, self.wav_out) if p is not None)
        if not kept:
            self._abort()
            self.error = OutputWriteError(f"{what} while writing the first block to {where}: nothing was kept")
            return self.error
        self._closed = True
        for w in (self._y4m, self._wav, self._sink):
            if w is not None:
                w.rollback()  # later writes (the muxer's trailer on close) are dropped
        _close_quietly(self._mp4, self._y4m, self._wav, self._sink)
        last = next(p for p in self.timeline if p.block == kept - 1)
        self.summary = {"blocks": kept, "frames": last.frames, "held_frames": 0, "samples": last.samples,
                        "video_s": float(last.video_end), "audio_s": float(last.audio_end),
                        "end_mismatch_s": float(last.video_end - last.audio_end),
                        "fragment_flush": self.fragment_flush, "error": str(err)}
        self.error = OutputWriteError(
            f"{what} while writing block {self.blocks + 1} to {where}: kept the first {kept} complete "
            f"block(s) ({float(last.video_end):.2f} s), and the file plays up to there. Free some space and "
            f"stream again")
        return self.error

    def _encode_frame(self, rgb: np.ndarray, pts: int, *, force_key: bool):
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        f.pts, f.time_base, f.duration = pts, 1 / self.fps, 1  # pts = frame index, exact
        if force_key:
            f.pict_type = av.video.frame.PictureType.I
        self._mp4.mux(self._vs.encode(f))

    def _encode_audio(self, *, limit: int, final: bool = False):
        """Encode pending audio up to absolute sample ``limit`` in whole AAC frames (all of it if final)."""
        size = self._as.codec_context.frame_size
        end = min(limit, self._samples)
        while self._fed < end and (final or end - self._fed >= size):
            n = min(size, end - self._fed)
            chunk, self._pending = self._pending[:n], self._pending[n:]
            fr = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = self.sample_rate, self._fed, Fraction(1, self.sample_rate)
            self._mp4.mux(self._as.encode(fr))
            self._fed += n

    def close(self) -> dict:
        """Hold the last frame until the video covers the audio, write all audio, finish every file."""
        if self._closed:
            return self.summary
        self._closed = True
        held = 0
        try:
            if self._mp4 is not None:
                held = max(0, self._frames_covering_samples(self._samples) - self._frames)
                held = held if self._last is not None else 0  # audio-only stream: nothing to hold
                for h in range(held):
                    self._encode_frame(self._last, self._frames + h, force_key=False)
                self._encode_audio(limit=self._samples, final=True)
                self._mp4.mux(self._vs.encode(None))
                self._mp4.mux(self._as.encode(None))
                self._mp4.close()  # writes the last fragment: held frames + tail audio
                if self._sink is not None and self._sink.error is not None:
                    raise self._sink.error
        except OSError as e:  # the tail did not fit: cut back to the last complete block
            raise self._write_failed(e) from None
        finally:
            if self.error is None:
                for w in (self._mp4, self._y4m, self._wav, self._sink):
                    if w is not None:
                        w.close()
                if self.sink is not None and self._mp4 is not None:
                    self.sink.cut("tail")
        video_end = Fraction(self._frames + held) / self.fps
        audio_end = Fraction(self._samples, self.sample_rate)
        self.summary = {"blocks": self.blocks, "frames": self._frames, "held_frames": held,
                        "samples": self._samples, "video_s": float(video_end), "audio_s": float(audio_end),
                        "end_mismatch_s": float(video_end - audio_end),
                        "fragment_flush": self.fragment_flush}
        if self.blocks and audio_end < video_end - 1 / self.fps:
            log.warning("audio ends %.3f s before the video (fps %s does not match the audio clock)",
                        float(video_end - audio_end), self.fps)
        return self.summary
