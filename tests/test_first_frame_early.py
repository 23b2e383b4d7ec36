"""The first frame leaves early: each latent frame's pixels go to ``on_frames`` as soon as they reach the
host, before the rest of their block is decoded, and in the same order and values as the whole block."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from hallolive_rt.options import DecoderOptions
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.session import StreamSession


@pytest.fixture(scope="module")
def comps(tiny_profile):
    return load_components(tiny_profile, None, with_text=False)


@pytest.mark.parametrize("overlap", [True, False])
def test_frames_arrive_one_latent_frame_at_a_time_and_add_up_to_the_blocks(comps, tiny_profile, overlap):
    seen = []
    sess = StreamSession(comps, tiny_profile, decoders=DecoderOptions(overlap=overlap), blocks=2,
                         on_frames=lambda f: seen.append(f))
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    blocks = list(sess.run(ctx, seed=0))
    fb = tiny_profile.stream.latent_frames_per_block
    assert [(f.block, f.latent_frame) for f in seen] == [(b, j) for b in range(2) for j in range(fb)]
    for b in blocks:
        mine = [f for f in seen if f.block == b.index]
        assert np.array_equal(np.concatenate([f.frames for f in mine]), b.frames)
        assert [f.ready_s for f in mine] == b.frame_ready_s
    assert [f.frames.shape[0] for f in seen[:fb]] == [1] + [4] * (fb - 1)  # the stream's first frame alone


def test_the_first_frame_leaves_before_its_block_is_decoded(comps, tiny_profile):
    """Overlapped: the writer hands frame 0 on while the decode thread still works on the block's last
    latent frame (slowed down here so that the order cannot come from luck)."""
    events, lock = [], threading.Lock()
    sess = StreamSession(comps, tiny_profile, decoders=DecoderOptions(overlap=True), blocks=1,
                         on_frames=lambda f: events.append(("sent", f.latent_frame, time.perf_counter())))
    runner = sess.pipeline.vrunner
    decode = runner.decode_frame

    def slow_decode(z, first):
        if not first:
            time.sleep(0.3)  # the block's later latent frames
        out = decode(z, first)
        with lock:
            events.append(("decoded", first, time.perf_counter()))
        return out

    runner.decode_frame = slow_decode
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    list(sess.run(ctx, seed=0))
    sent0 = next(t for kind, j, t in events if kind == "sent" and j == 0)
    last_decoded = max(t for kind, _, t in events if kind == "decoded")
    assert sent0 < last_decoded - 0.2, events
