"""StreamWriter: fragmented MP4 sync, kill safety, raw y4m/wav records, failure behaviour (CPU, 96x64)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the media writer's encoder) is not installed")

from hallolive_rt.runtime import media  # noqa: E402
from hallolive_rt.runtime.media import MediaError, StreamWriter, probe_media  # noqa: E402

W, H, SR = 96, 64, 16000


def tiny_blocks(profile):
    """Frame / sample counts per block of the tiny preset: 5 then 8 frames, 10 tokens = 5120 samples."""
    lf = profile.stream.latent_frames_per_block
    samples = profile.stream.audio_tokens_per_block * profile.audio.samples_per_token
    return lambda b: (profile.pixel_frames(lf, first_block=b == 0), samples)


def release_blocks(b):
    """The full preset's counts: 21 then 24 frames, 30 tokens = 15360 samples per block."""
    return (21 if b == 0 else 24), 15360


def frames_of(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def tone(n, start):
    t = np.arange(start, start + n)
    return (0.3 * np.sin(2 * np.pi * 440 * t / SR)).astype(np.float32)


def write_stream(path, blocks, shape, fps, *, cheap=False, **kw):
    with StreamWriter(path, width=W, height=H, fps=fps, sample_rate=SR, **kw) as w:
        s = 0
        for b in range(blocks):
            n, a = shape(b)
            fr = np.full((n, H, W, 3), 128, np.uint8) if cheap else frames_of(n, b)
            w.write_block(fr, tone(a, s))
            s += a
    return w


def top_boxes(path):
    data, off, out = Path(path).read_bytes(), 0, []
    while off + 8 <= len(data):
        size, typ = struct.unpack(">I4s", data[off:off + 8])
        out.append(typ.decode())
        off += size
    return out


@pytest.mark.parametrize("blocks", [3, 8])
def test_blocks_sync_and_held_frames(tmp_path, tiny_profile, blocks):
    fps = tiny_profile.fps
    assert fps == 25.0
    shape = tiny_blocks(tiny_profile)
    w = write_stream(tmp_path / "o.mp4", blocks, shape, fps)
    n = sum(shape(b)[0] for b in range(blocks))
    s = blocks * shape(0)[1]
    # Held-frame rule: ceil(S * fps / sr) - N; here the constant 3-frame offset of block 0.
    held = -(-s * 25 // SR) - n
    assert held == 3 and w.summary["held_frames"] == held and w.summary["end_mismatch_s"] == 0.0
    assert w.fragment_flush
    # The audio lead stays exactly 3 frames = 1920 samples after every block: an offset, not a drift.
    assert {p.audio_end - p.video_end for p in w.timeline} == {Fraction(3, 25)}

    p = probe_media(tmp_path / "o.mp4")
    assert p["error"] is None and len(p["streams"]) == 2
    (v,), (a,) = p["video"], p["audio"]
    assert (v["codec"], v["pix_fmt"], v["width"], v["height"]) == ("h264", "yuv420p", W, H)
    assert v["frames"] == v["packets"] == n + held
    # One fragment per block (each opens with an IDR frame) plus the closing one: held frames + tail audio.
    assert v["keyframes"] == blocks and top_boxes(tmp_path / "o.mp4").count("moof") == blocks + 1
    assert (a["codec"], a["sample_rate"], a["channels"]) == ("aac", SR, 1)
    assert a["samples"] >= s  # decoded audio: every sample plus the encoder's priming
    assert abs(v["end_s"] - a["end_s"]) < 1 / fps, (v["end_s"], a["end_s"])


def test_click_and_flash_play_together(tmp_path):
    """One frame per block flashes white and audio sample k * sr / fps clicks: decoded, they coincide."""
    counts = [5] + [8] * 7
    audio = np.zeros(5120 * len(counts), np.float32)
    marks = [sum(counts[:b]) + 2 for b in range(len(counts))]  # a frame inside each block
    audio[[k * SR // 25 for k in marks]] = 0.9
    with StreamWriter(tmp_path / "o.mp4", width=W, height=H, fps=25, sample_rate=SR) as w:
        for b, n in enumerate(counts):
            fr = np.zeros((n, H, W, 3), np.uint8)
            fr[2] = 255
            w.write_block(fr, audio[b * 5120:(b + 1) * 5120])
    with av.open(str(tmp_path / "o.mp4")) as c:
        flashes = [float(f.time) for f in c.decode(video=0) if f.to_ndarray(format="gray").mean() > 100]
    with av.open(str(tmp_path / "o.mp4")) as c:
        chunks = [(float(f.time), f.to_ndarray()[0]) for f in c.decode(audio=0)]
    t0 = chunks[0][0]
    pcm = np.concatenate([x for _, x in chunks])
    clicks = []
    for t in flashes:  # strongest sample within +-100 ms of each flash (clicks are 320 ms apart)
        lo = int((t - t0 - 0.1) * SR)
        clicks.append(t0 + (lo + int(np.abs(pcm[lo:lo + 3200]).argmax())) / SR)
    assert len(flashes) == len(marks)
    err = np.abs(np.array(clicks) - np.array(flashes))
    # Measured: 1 sample (62.5 us, the 1/12800 video time base). Without the shared priming shift it is 64 ms.
    assert err.max() < 0.003, f"click-vs-flash offsets (s): {err}"


@pytest.mark.parametrize("blocks", [8, 40])
def test_release_drift_at_24fps_and_none_at_25(tmp_path, blocks):
    """The release's 24 fps: video outruns the audio by 40 ms per block. Our 25 fps: constant offset."""
    w24 = write_stream(tmp_path / "r24.mp4", blocks, release_blocks, 24, cheap=True)
    w25 = write_stream(tmp_path / "r25.mp4", blocks, release_blocks, 25, cheap=True)
    lead24 = [p.audio_end - p.video_end for p in w24.timeline]
    assert all(b - a == Fraction(-1, 25) for a, b in zip(lead24, lead24[1:]))  # -40 ms every block
    assert {p.audio_end - p.video_end for p in w25.timeline} == {Fraction(3, 25)}
    assert abs(w24.timeline[-1].audio_lead_s - (0.125 - 0.04 * blocks)) < 1e-12

    p24, p25 = probe_media(tmp_path / "r24.mp4"), probe_media(tmp_path / "r25.mp4")
    gap24 = p24["video"][0]["end_s"] - p24["audio"][0]["end_s"]
    gap25 = p25["video"][0]["end_s"] - p25["audio"][0]["end_s"]
    expected24 = 0.04 * blocks - 0.125  # (24k - 3)/24 s of video against 0.96 k s of audio
    assert abs(gap24 - expected24) < 0.002, (gap24, expected24)
    assert w24.summary["held_frames"] == 0 and w25.summary["held_frames"] == 3
    assert abs(gap25) < 1 / 25, gap25
    assert p25["video"][0]["frames"] == 24 * blocks


def test_fractional_samples_per_frame_are_exact():
    """sr/fps non-integer (666.67 at 24 fps, 533.87 at 29.97): the released-audio bound is exact floor."""
    for fps in (24, Fraction(30000, 1001), 25, 12.5):
        w = StreamWriter(None, width=W, height=H, fps=fps, sample_rate=SR, wav_out=Path(os.devnull))
        f = Fraction(fps)
        for n in list(range(0, 200)) + [10**6 + 7, 10**9 + 3]:
            assert w._samples_until_frame(n) == (n * SR / f).__floor__()
            s = n * 641
            assert w._frames_covering_samples(s) == (s * f / SR).__ceil__()


def test_audio_never_ahead_of_video_while_streaming(tmp_path, tiny_profile):
    shape = tiny_blocks(tiny_profile)
    with StreamWriter(tmp_path / "o.mp4", width=W, height=H, fps=tiny_profile.fps, sample_rate=SR) as w:
        for b in range(4):
            n, a = shape(b)
            w.write_block(torch.from_numpy(frames_of(n, b)), torch.from_numpy(tone(a, b * a)))
            bound = w.timeline[-1].frames * SR // 25
            assert bound - 1024 < w._fed <= bound  # whole AAC frames up to the end of the video


def test_killed_subprocess_leaves_finished_blocks(tmp_path):
    out = tmp_path / "k.mp4"
    code = f"""
import os, signal, numpy as np
from hallolive_rt.runtime.media import StreamWriter
w = StreamWriter({str(out)!r}, width={W}, height={H}, fps=25, sample_rate={SR})
w.__enter__()
for b, n in enumerate((5, 8)):
    w.write_block(np.full((n, {H}, {W}, 3), 60 * b, np.uint8), np.zeros(5120, np.float32))
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    p = probe_media(out)
    assert p["error"] is None
    assert p["video"][0]["frames"] == 13 and p["video"][0]["keyframes"] == 2
    # Audio: all released audio (13 frames = 8320 samples) but the < 1 AAC frame not yet fed and the
    # <= 2 frames the encoder still held (decoded count includes the 1024 priming samples).
    assert p["audio"][0]["samples"] - 1024 > 8320 - 3 * 1024


def test_file_copied_mid_stream_and_torn_fragment(tmp_path, tiny_profile):
    shape, out = tiny_blocks(tiny_profile), tmp_path / "o.mp4"
    with StreamWriter(out, width=W, height=H, fps=25, sample_rate=SR) as w:
        for b in range(3):
            n, a = shape(b)
            w.write_block(frames_of(n, b), tone(a, b * a))
            if b == 1:
                shutil.copy(out, tmp_path / "copy.mp4")  # bytes on disk, no close
                size2 = out.stat().st_size
    assert probe_media(tmp_path / "copy.mp4")["video"][0]["frames"] == 13
    torn = tmp_path / "torn.mp4"  # killed while writing block 2's fragment
    torn.write_bytes(out.read_bytes()[:size2 + 300])
    assert probe_media(torn)["video"][0]["frames"] >= 13


def test_fragment_flush_is_what_saves_the_last_block(tmp_path, monkeypatch):
    """Without the explicit flush the mov muxer keeps block 1 in memory until block 2's keyframe."""
    for flush, expected in ((True, 13), (False, 5)):
        if not flush:
            monkeypatch.setattr(media, "_flush_fragment", lambda c: False)
        out = tmp_path / f"o{flush}.mp4"
        with StreamWriter(out, width=W, height=H, fps=25, sample_rate=SR) as w:
            for b, n in enumerate((5, 8)):
                w.write_block(frames_of(n, b), tone(5120, b * 5120))
            shutil.copy(out, tmp_path / "copy.mp4")
        assert probe_media(tmp_path / "copy.mp4")["video"][0]["frames"] == expected
        assert probe_media(out)["video"][0]["frames"] == 13 + 3


def test_flush_refuses_anything_but_an_mp4_output(tmp_path):
    import io

    with av.open(io.BytesIO(), "w", format="matroska") as mkv:
        assert media._flush_fragment(mkv) is False
    write_stream(tmp_path / "o.mp4", 1, lambda b: (5, 5120), 25)
    with av.open(str(tmp_path / "o.mp4")) as inp:
        assert media._flush_fragment(inp) is False
    assert media._flush_fragment(object()) is False and media._flush_fragment(b"\x10" * 64) is False


def test_y4m_and_wav_are_valid_and_raw(tmp_path, tiny_profile):
    shape = tiny_blocks(tiny_profile)
    y4m, wav = tmp_path / "f.y4m", tmp_path / "a.wav"
    sent_f, sent_a = [], []
    with StreamWriter(tmp_path / "o.mp4", width=W, height=H, fps=25, sample_rate=SR,
                      frames_out=y4m, wav_out=wav) as w:
        for b in range(3):
            n, a = shape(b)
            sent_f.append(np.tile(np.linspace(0, 255, W, dtype=np.uint8)[None, None, :, None], (n, H, 1, 3)))
            sent_a.append(tone(a, b * a))
            w.write_block(sent_f[-1], sent_a[-1])
            if b == 0:  # an interrupted WAV is valid up to the last block
                shutil.copy(wav, tmp_path / "part.wav")
    frames, audio = np.concatenate(sent_f), np.concatenate(sent_a)

    header = y4m.read_bytes().split(b"\n", 1)[0].decode().split()
    assert header == ["YUV4MPEG2", f"W{W}", f"H{H}", "F25:1", "Ip", "A1:1", "C444"]
    assert y4m.stat().st_size == len(" ".join(header)) + 1 + len(frames) * (6 + 3 * W * H)  # no held frames
    with av.open(str(y4m)) as c:
        back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    err = np.abs(back.astype(int) - frames)
    assert back.shape == frames.shape and err.mean() < 1.5 and err.max() <= 4, (err.mean(), err.max())

    with wave.open(str(wav)) as r:
        assert (r.getnchannels(), r.getsampwidth(), r.getframerate(), r.getnframes()) == (1, 2, SR, len(audio))
        pcm = np.frombuffer(r.readframes(r.getnframes()), "<i2")
    assert np.array_equal(pcm, np.round(audio * 32767).astype(np.int16))
    with wave.open(str(tmp_path / "part.wav")) as r:
        assert r.getnframes() == shape(0)[1]


def test_unwritable_paths_fail_early(tmp_path):
    kw = dict(width=W, height=H, fps=25, sample_rate=SR)
    with pytest.raises(MediaError, match="nope"):
        StreamWriter(tmp_path / "nope" / "o.mp4", **kw)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MediaError, match="file"):
        StreamWriter(tmp_path / "file" / "o.mp4", **kw)
    with pytest.raises(MediaError, match="directory"):
        StreamWriter(tmp_path, **kw)
    with pytest.raises(MediaError, match="wav"):
        StreamWriter(tmp_path / "o.mp4", wav_out=tmp_path / "x" / "a.wav", **kw)
    with pytest.raises(MediaError, match="even"):
        StreamWriter(tmp_path / "o.mp4", **{**kw, "width": 95})
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(MediaError, match="not writable"):
            StreamWriter(ro / "o.mp4", **kw)
    assert not (tmp_path / "o.mp4").exists()


def test_no_files_left_when_failing_before_first_block(tmp_path):
    outs = dict(path=tmp_path / "o.mp4", frames_out=tmp_path / "f.y4m", wav_out=tmp_path / "a.wav")
    kw = dict(width=W, height=H, fps=25, sample_rate=SR, **outs)
    with pytest.raises(RuntimeError, match="boom"):
        with StreamWriter(**kw):
            raise RuntimeError("boom")
    with pytest.raises(MediaError, match="frames must be"):
        with StreamWriter(**kw) as w:
            w.write_block(np.zeros((5, H + 2, W, 3), np.uint8), np.zeros(3200, np.float32))
    assert not any(p.exists() for p in outs.values())

    with pytest.raises(RuntimeError, match="later"):  # after a block: finished and playable
        with StreamWriter(**kw) as w:
            w.write_block(frames_of(5, 0), tone(5120, 0))
            raise RuntimeError("later")
    p = probe_media(outs["path"])
    assert p["error"] is None and p["video"][0]["frames"] == 5 + 3


def test_an_endless_stream_keeps_a_bounded_timeline(tmp_path):
    blocks = media.TIMELINE_KEEP + 6
    w = write_stream(tmp_path / "long.mp4", blocks, lambda b: (1, 640), 25, cheap=True)
    assert w.blocks == w.summary["blocks"] == blocks and w.summary["frames"] == blocks
    assert len(w.timeline) == media.TIMELINE_KEEP and w.timeline[-1].block == blocks - 1
    assert w.timeline[0].block == blocks - media.TIMELINE_KEEP
