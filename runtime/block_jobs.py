"""What travels between the decode pipeline's threads: a job per submitted block (``_Job``), a block on its way
to the host with its per-latent-frame progress (``_WriteJob``), the frames of one latent frame handed on
early (``FramesReady``) and a finished block on the host (``DecodedBlock``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np

from .block_marks import BlockMarks

__all__ = ["DecodedBlock", "FramesReady"]


@dataclass
class DecodedBlock:
    """One streamed block on the host. Times in seconds since the stream's start; stage times in ms."""

    index: int
    frames: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 [S] at the profile's sample rate (S = tokens per block x 512)
    times: dict[str, float] = field(default_factory=dict)  # dit, dit_steps, dit_context, vae_video, vae_audio, io_write
    start_s: float = 0.0  # the block's first DiT forward started
    first_frame_s: float = 0.0  # its first frame reached the host
    done_s: float = 0.0  # its last frame and all its audio reached the host
    frame_ready_s: list[float] = field(default_factory=list)  # per latent frame

    def without_media(self) -> "DecodedBlock":
        """This block's times and counts with its frames and audio dropped: arrays of the same shapes that
        hold no memory (read-only broadcasts of one zero), for keeping per-block records of long streams."""
        return replace(self, frames=np.broadcast_to(np.zeros((), self.frames.dtype), self.frames.shape),
                       audio=np.broadcast_to(np.zeros((), self.audio.dtype), self.audio.shape))


@dataclass
class _Job:
    index: int
    slot: int
    first_block: bool
    has_future: bool
    marks: BlockMarks  # DiT-side marks (dit device): final once ``sealed`` is set
    copied: object = None  # event (CUDA) the decode stream waits for
    sealed: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False  # the stream ended before the DiT sealed this job


@dataclass
class _WriteJob:
    """A block on its way to the host. The decode thread hands it to the writer before decoding (overlap
    mode) and appends each latent frame's mark as that frame's pixels are queued for the host, so the
    writer sends frame j as soon as it is there: the stream's first frame never waits for the block."""

    job: _Job
    hslot: int
    n_frames: int = 0
    frame_marks: list = field(default_factory=list)
    frame_ends: list = field(default_factory=list)  # host frame count after each latent frame
    marks: dict = field(default_factory=dict)
    error: BaseException | None = None
    progress: threading.Condition = field(default_factory=threading.Condition)

    def add_frame(self, mark, n_frames: int) -> None:
        with self.progress:
            self.frame_marks.append(mark)
            self.frame_ends.append(n_frames)
            self.progress.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.progress:
            self.error = e
            self.progress.notify_all()

    def done(self) -> None:
        with self.progress:
            self.marks["done"] = True
            self.progress.notify_all()

    def wait(self, ready) -> None:
        with self.progress:
            self.progress.wait_for(lambda: ready() or self.error is not None)
        if self.error is not None:
            raise self.error


@dataclass
class FramesReady:
    """Frames of one latent frame on the host, handed to ``on_frames`` before their block is complete."""

    block: int
    latent_frame: int
    frames: np.ndarray  # uint8 [n, H, W, 3]
    ready_s: float  # when they reached the host (seconds since the stream's start)
