"""Outputs of `hallolive-rt stream`: one writer per file (a second is refused, naming the first), no silent
overwrite (stream and profile), and a disk that fills up mid-stream: exit 2, one line, the file cut back to
its last complete block and playable. In-process except the other writer, which must be another process."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import wave

import pytest

pytest.importorskip("av", reason="the stream's MP4 is written with PyAV, which is not installed")

from typer.testing import CliRunner  # noqa: E402

from hallolive_rt.options import DecoderOptions, DiTOptions, OutputOptions
from hallolive_rt.cli import app  # noqa: E402
from hallolive_rt.runtime import outputs  # noqa: E402
from hallolive_rt.runtime.media import probe_media  # noqa: E402
from hallolive_rt.runtime.outputs import OutputLock, lock_path  # noqa: E402
from hallolive_rt.errors import InputError
from hallolive_rt.runtime.stream_run import stream_main  # noqa: E402

FAST = dict(dit=DiTOptions(kv_impl="torch"), decoders=DecoderOptions(overlap=False), progress=False)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _holder(path):
    """Another process holding the lock of ``path`` (as a stream writing it does), until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from hallolive_rt.runtime.outputs import OutputLock
        OutputLock({str(path)!r}, "--out").acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, "-c", code, "--pretend", "stream"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_with_the_first_ones_pid_and_command(tmp_path):
    out = tmp_path / "o.mp4"
    other = _holder(out)
    try:
        with pytest.raises(InputError) as e:
            stream_main("hi", outputs=OutputOptions(out=str(out)), blocks=1, **FAST)
        msg = str(e.value)
        assert f"is being written by another process: PID {other.pid}" in msg and "--pretend stream" in msg, msg
        assert not out.exists()
    finally:
        other.kill()  # however the holder ends, the kernel drops its lock
        other.wait()
    summary = stream_main("hi", outputs=OutputOptions(out=str(out)), blocks=1, **FAST)
    assert summary["blocks"] == 1 and probe_media(out)["error"] is None
    assert _files(tmp_path) == ["o.mp4"]  # the stale lock file of the killed holder is gone too


def test_lock_is_exclusive_and_released_on_any_exit(tmp_path):
    out = tmp_path / "o.mp4"
    with outputs.claim_outputs([("--out", out)]):
        assert lock_path(out).exists()
        with pytest.raises(outputs.OutputBusy, match=f"PID {os.getpid()}"):  # a second writer in this process too
            OutputLock(out).acquire()
    assert _files(tmp_path) == []
    with pytest.raises(RuntimeError):
        with outputs.claim_outputs([("--out", out)]):
            raise RuntimeError("the stream failed")
    assert _files(tmp_path) == []


def test_existing_outputs_are_refused_unless_overwrite(tmp_path):
    out, wav = tmp_path / "o.mp4", tmp_path / "o.wav"
    out.write_bytes(b"an earlier take")
    with pytest.raises(InputError, match="--out .*o.mp4' exists; pass --overwrite"):
        stream_main("hi", outputs=OutputOptions(out=str(out), wav_out=str(wav)), blocks=1, **FAST)
    assert out.read_bytes() == b"an earlier take" and _files(tmp_path) == ["o.mp4"]
    summary = stream_main("hi", outputs=OutputOptions(out=str(out), wav_out=str(wav), overwrite=True), blocks=1, **FAST)
    assert summary["blocks"] == 1 and probe_media(out)["video"][0]["frames"] > 0
    assert _files(tmp_path) == ["o.mp4", "o.wav"]


def test_profile_writes_its_stream_into_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hallolive.mp4").write_bytes(b"not the profile's")
    args = ["profile", "--out-dir", "prof", "--warmup-runs", "0", "--preset", "tiny", "--blocks", "1",
            "--kv-impl", "torch"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output[-3000:]
    assert (tmp_path / "hallolive.mp4").read_bytes() == b"not the profile's"
    assert probe_media(tmp_path / "prof" / "stream.mp4")["error"] is None
    r = CliRunner().invoke(app, [*args, "--out", "hallolive.mp4"])  # an explicit --out keeps the rule
    assert r.exit_code == 2 and "'hallolive.mp4' exists; pass --overwrite" in r.stderr, r.output


def test_disk_full_keeps_the_complete_blocks_and_says_so(tmp_path, monkeypatch):
    """ENOSPC injected where the bytes leave the process (FileSink.write, the writer's file layer), in
    block 3 of the MP4: exit 2, one line, the MP4 and WAV cut back to blocks 1-2, both playable."""
    out, wav = tmp_path / "o.mp4", tmp_path / "o.wav"

    class FullDisk:  # the raw file under the MP4's sink: the third block fragment (> 4 kB) does not fit
        def __init__(self, f):
            self.f, self.fragments = f, 0

        def write(self, b):
            if len(b) > 4096:
                self.fragments += 1
                if self.fragments == 3:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real_init = outputs.FileSink.__init__

    def init(self, path):
        real_init(self, path)
        if self.path == out:
            self._f = FullDisk(self._f)

    monkeypatch.setattr(outputs.FileSink, "__init__", init)
    r = CliRunner().invoke(app, ["stream", "--blocks", "4", "--out", str(out), "--wav-out", str(wav),
                                 "--kv-impl", "torch"])
    assert r.exit_code == 2, r.output[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "the disk is full while writing block 3" in lines[0], lines[0]
    assert "kept the first 2 complete block(s) (0.52 s), and the file plays up to there" in lines[0], lines[0]
    info = probe_media(out)
    assert info["error"] is None and info["video"][0]["frames"] == 5 + 8, info
    assert info["audio"][0]["samples"] > 0
    with wave.open(str(wav)) as w:
        assert w.getnframes() == 2 * 10 * 512
    assert _files(tmp_path) == ["o.mp4", "o.wav"]  # no lock file, nothing else
