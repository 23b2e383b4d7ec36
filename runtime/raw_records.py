"""The raw records of a stream beside its MP4, ``--frames-out`` (.y4m) and ``--wav-out`` (.wav): exactly
what the model produced (no held frames, no alignment), the .y4m append-only, the .wav header rewritten
after every block, so both are valid however the stream ends; both write through a ``FileSink``
(``commit`` after a block, ``rollback`` after a failed write, driven by ``StreamWriter``).
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .outputs import FileSink

__all__ = ["_WavWriter", "_Y4mWriter"]


class _WavWriter:
    """16-bit PCM mono WAV whose RIFF/data sizes are rewritten after every block (valid if interrupted)."""

    def __init__(self, path: Path, sample_rate: int):
        self.fh = FileSink(path)
        self.rate, self.bytes, self.committed_bytes = sample_rate, 0, 0
        self._header()

    def _header(self):
        self.fh.seek(0)
        self.fh.write(b"RIFF" + struct.pack("<I", 36 + self.bytes) + b"WAVE")
        self.fh.write(b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, self.rate, 2 * self.rate, 2, 16))
        self.fh.write(b"data" + struct.pack("<I", self.bytes))

    def write(self, audio: np.ndarray):  # [S] float32 in [-1, 1]
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
        self.fh.seek(0, os.SEEK_END)
        self.fh.write(pcm.tobytes())
        self.bytes += pcm.nbytes
        self._header()

    def commit(self):
        self.fh.seek(0, os.SEEK_END)
        self.fh.commit()
        self.committed_bytes = self.bytes

    def rollback(self):
        """Back to the last complete block: the header (rewritten in place) and the data size."""
        self.bytes = self.committed_bytes
        try:
            self._header()
        except OSError:
            pass  # the header then still counts the lost tail; players read to the end of the file anyway
        self.fh.rollback()

    def close(self):
        self.fh.close()


class _Y4mWriter:
    """YUV4MPEG2 4:4:4 (BT.601, limited range: the y4m default), one FRAME record appended per frame."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction):
        self.fh = FileSink(path)
        self.fh.write(f"YUV4MPEG2 W{width} H{height} F{fps.numerator}:{fps.denominator} Ip A1:1 C444\n"
                      .encode())

    def write(self, frames: np.ndarray):  # [N, H, W, 3] uint8 RGB
        for rgb in frames:
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv444p")
            self.fh.write(b"FRAME\n" + yuv.to_ndarray().tobytes())  # [3, H, W] planar

    def commit(self):
        self.fh.commit()

    def rollback(self):
        self.fh.rollback()

    def close(self):
        self.fh.close()
