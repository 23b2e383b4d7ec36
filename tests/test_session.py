"""StreamSession on the tiny preset (CPU): counts, determinism, equality with the plain sequential
reference (generate + block-wise video decode + streamed audio decode), NVTX stages, stream_main."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hallolive_rt.options import DecoderOptions, OutputOptions, from_flat
from hallolive_rt.model.audio_stream import StreamingAudioDecoder
from hallolive_rt.nvtx import StageTimer
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.decode_pipeline import frames_to_uint8
from hallolive_rt.errors import InputError
from hallolive_rt.runtime.session import BlockNoise, StreamSession
from hallolive_rt.runtime.stream_run import stream_main

PROMPT = "A woman looks into the camera and says: hello there."


@pytest.fixture(scope="module")
def comps():
    return load_components(load_profile("tiny"), seed=0)


@pytest.fixture(scope="module")
def ctx():
    return 0.5 * torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(5))


def _reference(c, p, ctx, seed, blocks):
    """The same stream without the session: generate() on the same noise, then sequential decoding."""
    init = BlockNoise(p, seed, "cpu", c.dtype)
    nv = torch.cat([init.video(j) for j in range(blocks)], 1)
    na = torch.cat([init.audio(j) for j in range(blocks)], 1)
    res = generate(c.dit, p, ctx, nv, na, TorchNoise(seed + 1))
    fb, n = p.stream.latent_frames_per_block, p.stream.audio_tokens_per_block
    vstate = c.video_decoder.new_state(1, p.video.latent_height, p.video.latent_width)
    adec = StreamingAudioDecoder.from_profile(p, c.audio_vae, c.vocoder)
    astate = adec.new_state(1)
    out = []
    with torch.no_grad():
        for i in range(blocks):
            z = res.video[:, i * fb:(i + 1) * fb].transpose(1, 2)
            x = c.video_decoder.decode_block(z, vstate, first_block=i == 0)
            wav = adec.step(astate, res.audio[:, i * n:(i + 1) * n])
            out.append((frames_to_uint8(x[0]).numpy(), wav[0].numpy()))
    return out


@pytest.mark.parametrize("overlap", [True, False])
def test_session_equals_sequential_reference(comps, ctx, overlap):
    p = comps.profile
    got = list(StreamSession(comps, p, decoders=DecoderOptions(overlap=overlap)).run(ctx, seed=3))
    ref = _reference(comps, p, ctx, 3, p.stream.blocks)
    assert [b.index for b in got] == list(range(p.stream.blocks))
    for b, (frames, audio) in zip(got, ref):
        # same ops in the same order on CPU: bit-identical, threads and hand-off included
        assert np.array_equal(b.frames, frames), f"block {b.index} frames differ"
        assert np.array_equal(b.audio, audio), f"block {b.index} audio: max {np.abs(b.audio - audio).max()}"


def test_eager_end_to_end_counts_and_text_release():
    p = load_profile("tiny")
    c = load_components(p, seed=1)
    sess = StreamSession(c, p)
    got = list(sess.stream(PROMPT, seed=0))
    assert c.text_encoder is None and sess.text_encode_s > 0  # encoder freed after the prompt
    with pytest.raises(RuntimeError, match="released"):
        sess.encode(PROMPT)
    fb, spt = p.stream.latent_frames_per_block, p.audio.samples_per_token
    assert [b.frames.shape[0] for b in got] == [1 + 4 * (fb - 1)] + [4 * fb] * (p.stream.blocks - 1)
    for b in got:
        assert b.frames.dtype == np.uint8 and b.frames.shape[1:] == (p.pixel_height, p.pixel_width, 3)
        assert b.audio.dtype == np.float32 and b.audio.shape == (p.stream.audio_tokens_per_block * spt,)
        assert np.isfinite(b.audio).all() and b.frames.std() > 0  # not a constant image
        assert 0 <= b.start_s <= b.first_frame_s <= b.done_s
        assert set(b.times) >= {"dit", "dit_steps", "dit_context", "vae_video", "vae_audio"}
        assert len(b.frame_ready_s) == fb


def test_seed_determinism_and_future_tokens(comps, ctx):
    a = list(StreamSession(comps).run(ctx, seed=1))
    b = list(StreamSession(comps).run(ctx, seed=1))
    c = list(StreamSession(comps).run(ctx, seed=2))
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert not np.array_equal(a[-1].frames, c[-1].frames)
    f = list(StreamSession(comps, future_audio_tokens=5).run(ctx, seed=1))
    assert [x.audio.shape for x in f] == [x.audio.shape for x in a]  # lookahead is never committed


def test_rolling_stream_longer_than_the_clip(comps, ctx):
    sess = StreamSession(comps, decoders=DecoderOptions(overlap=False), blocks=5)
    assert sess.policy.name == "rolling"
    got = list(sess.run(ctx, seed=0))
    assert len(got) == 5 and all(np.isfinite(b.audio).all() for b in got)


def test_stage_ranges_per_block(comps, ctx):
    timer = StageTimer("cpu")
    sess = StreamSession(comps, decoders=DecoderOptions(overlap=False), on_block=lambda b: None)
    with timer:
        list(sess.run(ctx, seed=0))
    names = [r.name for r in timer.records()]
    n, steps = comps.profile.stream.blocks, len(comps.profile.stream.denoising_steps)
    for name, count in (("session", 1), ("block", n), ("dit/step", n * steps), ("dit/context", n),
                        ("vae/video", n), ("vae/audio", n), ("io/write", n)):
        assert names.count(name) == count, (name, names.count(name))
    steps_of_block0 = [r.step for r in timer.records() if r.name == "dit/step" and r.block == 0]
    assert steps_of_block0 == list(range(steps))


def test_stream_main_writes_mp4_and_metrics(tmp_path):
    from hallolive_rt.runtime.media import probe_media

    out, met = tmp_path / "o.mp4", tmp_path / "m.json"
    s = stream_main(PROMPT, outputs=OutputOptions(out=str(out), metrics=str(met)), progress=False)
    info = probe_media(out)
    assert info["error"] is None and info["video"][0]["codec"] == "h264" and info["audio"][0]["codec"] == "aac"
    assert s["frames_generated"] == 5 + 8 + 8 and s["audio_samples"] == 3 * 10 * 512
    # the MP4 holds 3 more: the last frame held to cover the audio's tail, and says so
    assert s["frames_written"] == info["video"][0]["frames"] == 21 + 3
    m = json.loads(met.read_text())
    for k in ("ttff_s", "steady_fps", "block_time_s", "inter_block_gap_s", "per_block", "frames",
              "audio_samples", "device", "dtype", "env", "text_encode_s", "dit_only_fps_equiv"):
        assert k in m, k
    assert m["frames"] == m["frames_generated"] == 21 and m["frames_written"] == 24
    assert m["env"]["torch"] == torch.__version__


@pytest.mark.parametrize("kwargs,match", [
    ({"blocks": 0}, "blocks must be a whole number >= 1"),
    ({"preset": "nope"}, "unknown preset"),
    ({"preset": "hallolive-512x992"}, "needs weights"),
    ({"random_weights": True, "model_dir": "/x"}, "exclude each other"),
    ({"preset": "hallolive-512x992", "model_dir": "MISSING"}, "6 model files missing"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda"),
    ({"backend": "warp"}, "--backend 'warp': choose one of"),
    ({"prompt": "   "}, "empty"),
    ({"prompt": "x" * 600}, "too long"),
    ({"out": "/nonexistent-dir/o.mp4"}, "does not exist"),
    ({"metrics": "/nonexistent-dir/m.json"}, "metrics"),
])
def test_stream_main_rejects_bad_input_before_writing(tmp_path, kwargs, match, monkeypatch):
    kw = dict(kwargs)
    prompt = kw.pop("prompt", PROMPT)
    if kw.get("model_dir") == "MISSING":
        kw["model_dir"] = str(tmp_path / "models")
        (tmp_path / "models").mkdir()
        # as with the `text` extra installed (without it, that is what a --model-dir run reports first)
        monkeypatch.setattr("hallolive_rt.model.text_tokenizer.require_text_extra", lambda: None)
    kw.setdefault("out", str(tmp_path / "o.mp4"))
    with pytest.raises(InputError, match=match) as e:
        model, dit, decoders = from_flat(kw)
        stream_main(prompt, model=model, dit=dit, decoders=decoders, blocks=kw.get("blocks"), progress=False,
                    outputs=OutputOptions(out=kw["out"], metrics=kw.get("metrics")))
    assert e.value.exit_code == 2
    assert not (tmp_path / "o.mp4").exists()
