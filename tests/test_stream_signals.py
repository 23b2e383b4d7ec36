"""How a user ends `hallolive-rt stream --blocks endless`: SIGINT / SIGTERM. One line says what was written,
the exit code is 130 / 143, and the file decodes with both tracks ending together (within one frame).

Real processes (the signal and the exit code are the point); the two run at the same time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("av", reason="the stream's MP4 is written with PyAV, which is not installed")

from hallolive_rt.runtime.media import probe_media  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LINE = re.compile(r"interrupted by (SIG\w+): wrote (\d+) blocks \(([\d.]+) s of video, ([\d.]+) s of audio\) to "
                  r"(\S+); the file is complete and playable")


class _Stream:
    """An endless tiny stream whose stderr lines are collected as they come."""

    def __init__(self, out, *extra):
        self.proc = subprocess.Popen([sys.executable, "-m", "hallolive_rt.cli", "stream", "--blocks", "endless",
                                      "--out", str(out), "--kv-impl", "torch", *extra],
                                     stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")))
        self.reader.start()

    def blocks_logged(self) -> int:
        return sum(1 for ln in list(self.lines) if re.match(r"\[\d+\] block \d+:", ln))


def test_sigint_and_sigterm_end_an_endless_stream_on_a_block_boundary(tmp_path):
    """SIGTERM with the decode overlapped (the default: blocks the DiT already finished are decoded and
    written before the end), SIGINT with everything inline."""
    runs = {signal.SIGINT: _Stream(tmp_path / "int.mp4", "--no-overlap"),
            signal.SIGTERM: _Stream(tmp_path / "term.mp4")}
    try:
        deadline = time.monotonic() + 240
        pending = dict(runs)
        while pending and time.monotonic() < deadline:
            for sig, run in list(pending.items()):
                assert run.proc.poll() is None, "".join(run.lines)[-3000:]
                if run.blocks_logged() >= 1:  # per-block lines: stderr is a pipe, not a terminal
                    run.proc.send_signal(sig)
                    del pending[sig]
            time.sleep(0.1)
        assert not pending, "streams did not log two blocks in time"
        for run in runs.values():
            run.proc.wait(timeout=120)
            run.reader.join()
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
    for sig, run in runs.items():
        err = "".join(run.lines)
        assert run.proc.returncode == 128 + sig, (run.proc.returncode, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        m = LINE.search(err.strip().splitlines()[-1])
        assert m and m.group(1) == sig.name, err[-2000:]
        n, video_s, audio_s, path = int(m.group(2)), float(m.group(3)), float(m.group(4)), m.group(5)
        assert n >= 1 and abs(video_s - audio_s) < 1 / 25
        info = probe_media(path)
        assert info["error"] is None, info["error"]
        (v,), (a,) = info["video"], info["audio"]
        # every written block whole (5 frames, then 8 per block) + the 3 frames held to cover the audio
        assert v["frames"] == 5 + 8 * (n - 1) + 3, (n, v["frames"])
        assert abs(a["duration_s"] - v["duration_s"]) < 1 / 25, (a["duration_s"], v["duration_s"])
        assert abs(a["duration_s"] - (n * 10 * 512 + 1024) / 16000) < 1 / 25  # all audio (+ AAC priming)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int.mp4", "term.mp4"]  # no lock files left
