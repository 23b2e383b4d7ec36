"""Block geometry from ``Profile.with_overrides``: other latent grids and block lengths without a new file,
validated by the same rules as a profile file, and streamed end to end (DiT, both decoders) on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hallolive_rt.options import DecoderOptions
from hallolive_rt.profile import ProfileError, load_profile
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.session import BlockNoise, StreamSession
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate


@pytest.fixture(scope="module")
def ctx():
    return 0.5 * torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def comps():
    """The tiny models: weights do not depend on the block geometry, only the session's state does."""
    return load_components(load_profile("tiny"), seed=0, with_text=False)


def test_geometry_overrides_derive_the_shapes(tiny_profile):
    p = tiny_profile.with_overrides(latent_frames_per_block=3, latent_height=48, latent_width=48)
    assert p.stream.audio_tokens_per_block == 15  # follows the frames: 5 tokens per latent frame
    assert (p.pixel_height, p.pixel_width, p.tokens_per_latent_frame) == (768, 768, 576)
    assert p.video_tokens_per_block == 3 * 576 and p.audio_window == 15
    assert p.digest() != tiny_profile.digest()  # an artifact built for the other shapes is refused
    assert tiny_profile.stream.latent_frames_per_block == 2  # the original is unchanged (frozen copy)
    assert tiny_profile.with_overrides(batch=2).stream.batch == 2


@pytest.mark.parametrize("kw,match", [
    ({"latent_height": 47}, r"profile tiny with latent_height=47: latent grid 47x6 must be even"),
    ({"latent_width": 0}, r"latent_width must be >= 2, got 0"),
    ({"latent_frames_per_block": 0}, r"latent_frames_per_block must be >= 1, got 0"),
    ({"latent_frames_per_block": 3, "audio_tokens_per_block": 10},
     r"audio_tokens_per_block \(10\) must equal latent_frames_per_block x tokens_per_latent_frame \(3 x 5\)"),
    ({"audio_tokens_per_block": 12}, r"audio_tokens_per_block \(12\) must equal"),
    ({"blocks": 0}, r"blocks must be >= 1, got 0"),
    ({"batch": 0}, r"batch must be >= 1, got 0"),
    ({"future_audio_tokens": -1}, r"future_audio_tokens must be >= 0, got -1"),
    ({"latent_height": 4.0}, r"latent_height must be an integer, got 4.0"),
    ({"dtype": "int8"}, r"unknown dtype 'int8'"),
])
def test_bad_overrides_are_refused_with_the_profile_file_rules(tiny_profile, kw, match):
    with pytest.raises(ProfileError, match=match):
        tiny_profile.with_overrides(**kw)


def test_three_frames_per_block_streams(comps, ctx):
    """The whole session (DiT, video and audio decoders) on 3 latent frames + 15 audio tokens per block."""
    p = load_profile("tiny").with_overrides(latent_frames_per_block=3)
    got = list(StreamSession(comps, p, decoders=DecoderOptions(overlap=False), blocks=2).run(ctx, seed=1))
    assert [b.frames.shape[0] for b in got] == [1 + 4 * 2, 4 * 3]
    for b in got:
        assert b.frames.shape[1:] == (64, 96, 3) and b.audio.shape == (15 * 512,)
        assert np.isfinite(b.audio).all() and b.frames.std() > 0


def test_48x48_latent_grid_streams(comps, ctx):
    """The DiT loop on a 48x48 latent grid (24x24 tokens per frame), and the decoder state it would feed.

    The tiny video decoder takes ~16 s per latent frame at 768x768 on 2 CPU cores, so this test stops at
    the latents; the whole session runs on other geometry in the test above."""
    p = load_profile("tiny").with_overrides(latent_height=48, latent_width=48)
    init = BlockNoise(p, 0, "cpu", torch.float32)
    nv, na = torch.cat([init.video(j) for j in range(2)], 1), torch.cat([init.audio(j) for j in range(2)], 1)
    assert nv.shape == (1, 4, 48, 48, 48) and na.shape == (1, 20, 20)
    res = generate(comps.dit, p, ctx, nv, na, TorchNoise(1), record=True)
    assert res.video.shape == nv.shape and res.audio.shape == na.shape
    assert torch.isfinite(res.video).all() and res.video.std() > 0
    assert res.records[0].flow_v.shape == (1, 2, 48, 48, 48)  # the forward saw the whole 48x48 grid
    state = comps.video_decoder.new_state(1, p.video.latent_height, p.video.latent_width)
    assert state.history[0].shape[-2:] == (48, 48)
