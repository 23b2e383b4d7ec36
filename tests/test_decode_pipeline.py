"""The decode pipeline (runtime/decode_pipeline.py) on CPU: overlapped threads == inline == plain decode;
ordering, back-pressure and error propagation; device-name validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hallolive_rt.runtime.block_marks import BlockMarks
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.decode_pipeline import DecodePipeline, frames_to_uint8
from hallolive_rt.runtime.placement import resolve_devices
from hallolive_rt.runtime.vae_runner import set_conv_layout

from hallolive_rt.cache_policy import choose_policy
from hallolive_rt.model.audio_stream import StreamingAudioDecoder
from hallolive_rt.options import DecoderOptions, VideoDecodeOptions
from hallolive_rt.profile import load_profile
from hallolive_rt.stream import BlockOutput


@pytest.fixture(scope="module")
def comps():
    return load_components(load_profile("tiny").with_overrides(future_audio_tokens=5), seed=0, with_text=False)


def _latents(p, blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, v = p.stream, p.video
    plans = list(zip(range(blocks), choose_policy(p, None).plans()))
    return [BlockOutput(i, torch.randn(1, s.latent_frames_per_block, 48, v.latent_height, v.latent_width, generator=g),
                        torch.randn(1, s.audio_tokens_per_block, 20, generator=g),
                        torch.randn(1, s.future_audio_tokens, 20, generator=g), plan) for i, plan in plans]


def _marks(pipe):
    m = pipe.clock.mark()
    return BlockMarks(dit_start=m, context=(m, m), dit_end=m)


def _run(pipe, outs, drain_each=False):
    pipe.start()
    got = []
    for o in outs:
        pipe.submit(o, _marks(pipe))
        if drain_each:
            got += pipe.ready()
    return got + pipe.finish()


def _plain(c, p, outs):
    vstate = c.video_decoder.new_state(1, p.video.latent_height, p.video.latent_width)
    adec = StreamingAudioDecoder.from_profile(p, c.audio_vae, c.vocoder)
    astate = adec.new_state(1)
    res = []
    with torch.no_grad():
        for o in outs:
            x = c.video_decoder.decode_block(o.video.transpose(1, 2), vstate, first_block=o.index == 0)
            res.append((frames_to_uint8(x[0]).numpy(), adec.step(astate, o.audio, o.audio_future)[0].numpy()))
    return res


def test_overlapped_pipeline_equals_plain_sequential_decode(comps):
    p = comps.profile
    outs = _latents(p, 5)  # more blocks than staging (2) and host slots (3): slot reuse is exercised
    ref = _plain(comps, p, outs)
    written = []
    threaded = _run(DecodePipeline(comps, p, overlap=True, on_block=lambda b: written.append(b.index)), outs, True)
    inline = _run(DecodePipeline(comps, p, overlap=False), outs)
    assert [b.index for b in threaded] == [b.index for b in inline] == list(range(5)) == written
    for got in (threaded, inline):
        for b, (frames, audio) in zip(got, ref):
            assert np.array_equal(b.frames, frames) and np.array_equal(b.audio, audio), f"block {b.index}"


@pytest.mark.parametrize("runner", [VideoDecodeOptions("eager", True), VideoDecodeOptions("compiled", compile_backend="aot_eager")],
                         ids=["eager+cl3d", "compiled"])
def test_overlapped_equals_sequential_with_each_video_runner(comps, runner):
    """The decode thread drives the runner (a compiled one included) exactly as the inline path does."""
    torch._dynamo.reset()
    p = comps.profile
    outs = _latents(p, 3, seed=2)
    ref = _plain(comps, p, outs)
    pipe = DecodePipeline(comps, p, overlap=True, video_runner=runner)
    threaded = _run(pipe, outs, True)
    inline = _run(DecodePipeline(comps, p, overlap=False, video_runner=runner), outs)
    d = pipe.describe()
    assert d["overlap"] is True and d["vae"]["label"] == pipe.vrunner.opts.label
    assert "stream_priorities" not in d  # CPU: no streams
    for a, b, (frames, audio) in zip(threaded, inline, ref):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio), f"block {a.index}"
        # vs the plain contiguous eager decode: fp32 within 1e-5 before rounding, so at most 1 level
        assert np.abs(a.frames.astype(int) - frames.astype(int)).max() <= 1 and np.array_equal(a.audio, audio)
    set_conv_layout(comps.video_decoder, False)


def test_single_host_slot_back_pressure_keeps_order(comps):
    p = comps.profile
    outs = _latents(p, 4, seed=1)
    got = _run(DecodePipeline(comps, p, overlap=True, host_slots=1), outs)
    ref = _plain(comps, p, outs)
    assert [b.index for b in got] == [0, 1, 2, 3]
    assert all(np.array_equal(b.frames, f) for b, (f, _) in zip(got, ref))
    assert all(b.first_frame_s <= b.done_s for b in got)


def test_writer_error_surfaces_on_the_main_thread(comps):
    p = comps.profile

    def boom(b):
        raise OSError("disk full")

    pipe = DecodePipeline(comps, p, overlap=True, on_block=boom)
    with pytest.raises(OSError, match="disk full"):
        _run(pipe, _latents(p, 2))
    assert pipe._threads == []  # workers stopped


def test_device_names_are_validated():
    assert resolve_devices("cpu") == (torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="not a device name"):
        resolve_devices("gpu0")
    with pytest.raises(ValueError, match="both must be CUDA or both CPU|no CUDA device|CUDA device"):
        resolve_devices("cpu", "cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--dit-device cuda:1: no CUDA device"):
            resolve_devices("cuda:1")


def test_uint8_conversion_range():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0]).view(1, 5, 1, 1).expand(3, 5, 1, 1)
    u = frames_to_uint8(x)
    assert u.shape == (5, 1, 1, 3) and u[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.cuda
def test_cuda_pipeline_same_device_equals_inline():
    p = load_profile("tiny")
    c = load_components(p, dit_device="cuda", seed=0, with_text=False)
    outs = [replace(o, video=o.video.cuda(), audio=o.audio.cuda(), audio_future=o.audio_future.cuda())
            for o in _latents(p, 4)]
    a = _run(DecodePipeline(c, p, overlap=True), outs)
    b = _run(DecodePipeline(c, p, overlap=False), outs)
    for x, y in zip(a, b):
        assert np.array_equal(x.frames, y.frames) and np.allclose(x.audio, y.audio, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("vae", ["eager", "cudagraph+cl3d"])
def test_cuda_priorities_applied_and_overlap_equals_sequential(vae):
    """One GPU: the DiT on a higher-priority stream than the decode and copy streams; the overlapped
    session (decode of block i while the DiT runs i+1) gives the sequential session's frames."""
    from hallolive_rt.runtime.placement import DECODE_STREAM_PRIORITY, DIT_STREAM_PRIORITY
    from hallolive_rt.runtime.session import StreamSession

    p = load_profile("tiny")
    c = load_components(p, dit_device="cuda", seed=0, with_text=False)
    ctx = (0.5 * torch.randn(1, p.text.text_len, p.text.text_dim, generator=torch.Generator().manual_seed(5))).cuda()
    runs = {}
    for overlap in (True, False):
        sess = StreamSession(c, p, decoders=DecoderOptions(runner=vae, overlap=overlap))
        pr = sess.describe()["stream_priorities"]
        # read back from CUDA (cudaStreamGetPriority): lower number = higher priority
        assert pr["decode"] == pr["copy"] and pr["dit"] < pr["decode"], f"the DiT must outrank the decoder: {pr}"
        assert DIT_STREAM_PRIORITY < DECODE_STREAM_PRIORITY
        assert sess.describe()["overlap"] is overlap and sess.describe()["vae"]["label"] == vae
        runs[overlap] = list(sess.run(ctx, seed=1))
    for a, b in zip(runs[True], runs[False]):
        assert a.index == b.index and np.array_equal(a.frames, b.frames), f"block {a.index}"
        assert np.allclose(a.audio, b.audio, atol=1e-5)


def test_cuda_without_an_index_names_the_current_device(monkeypatch):
    """load_components / DecodePipeline / StreamSession canonicalize "cuda" to "cuda:N": a worker thread's
    torch.cuda.set_device refuses an index-less device (on the H100 every overlapped tiny session built
    with dit_device="cuda" lost its decode thread that way and waited for it until the test timed out)."""
    from hallolive_rt.runtime.placement import canonical_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert canonical_device("cuda") == torch.device("cuda", 1)
    assert canonical_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert canonical_device("cuda:0") == torch.device("cuda", 0)
    assert canonical_device("cpu") == torch.device("cpu")


def test_a_worker_thread_that_cannot_start_fails_the_stream_instead_of_hanging_it(comps, monkeypatch):
    """If a decode/writer thread's set-up raises, every block it gets fails with that error and gives back
    its staging slot: the DiT thread gets the error from ready()/finish(), it never waits forever."""
    import threading

    def broken(self):
        raise ValueError("Expected a torch.device with a specified index or an integer, but got: cuda")

    monkeypatch.setattr(DecodePipeline, "_thread_setup", broken)
    p = comps.profile
    pipe = DecodePipeline(comps, p, overlap=True)
    result = {}

    def run():
        try:
            _run(pipe, _latents(p, 4))  # 4 blocks: the third needs the first staging slot back
        except ValueError as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the stream hung on a dead worker thread"
    assert "specified index" in str(result.get("error")) and pipe._threads == []
