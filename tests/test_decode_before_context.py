"""The decoders start on a block's committed latents before the DiT's context pass of that block.

The context pass (t = 0) only refreshes the caches for the next block, so a session hands the block to
the decoders right after its denoising steps (``BlockStream.denoise_block``) and runs the context pass
(``refresh_caches``) while the block decodes: the first frame does not wait for it (TTFF), and the
stream's frames are unchanged (tests/test_session.py holds them to the sequential reference).
"""

from __future__ import annotations

import threading

import pytest
import torch
from hallolive_rt.runtime.block_marks import BlockMarks
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.decode_pipeline import DecodePipeline
from hallolive_rt.runtime.session import StreamSession

from hallolive_rt.cache_policy import choose_policy
from hallolive_rt.options import DecoderOptions
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockOutput, BlockStream
from tests.dit_fixtures import tiny_dit, tiny_inputs


@pytest.fixture(scope="module")
def comps():
    return load_components(load_profile("tiny"), seed=0, with_text=False)


@pytest.fixture(scope="module")
def ctx():
    return 0.5 * torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(5))


def _spy_refresh(sess) -> list[float]:
    """Record, per block, when its context pass starts (seconds on the session's clock)."""
    starts, orig = [], sess.bs.refresh_caches

    def refresh(out):
        starts.append(sess.pipeline.clock.now_s())
        return orig(out)

    sess.bs.refresh_caches = refresh
    return starts


def test_sequential_session_decodes_each_block_before_its_context_pass(comps, ctx):
    sess = StreamSession(comps, comps.profile, decoders=DecoderOptions(overlap=False))
    starts = _spy_refresh(sess)
    blocks = list(sess.run(ctx, seed=3))
    assert len(starts) == len(blocks) == comps.profile.stream.blocks
    for b, t in zip(blocks, starts):
        # every frame of the block reached the host before the DiT began its context pass
        assert b.first_frame_s <= b.frame_ready_s[-1] <= t, (b.index, b.frame_ready_s, t)
        # and the DiT's time excludes the decode done inline in between (the hand-off is not DiT work)
        dit, parts = b.times["dit"], b.times["dit_steps"] + b.times["dit_context"]
        assert parts <= dit < parts + 0.5 * b.times["vae_video"], b.times


def test_overlapped_session_hands_over_before_the_context_pass(comps, ctx):
    """With threads the decode runs beside the context pass: each block was submitted (its decode
    queued) before its context pass started, and its marks were complete when it was written."""
    sess = StreamSession(comps, comps.profile, decoders=DecoderOptions(overlap=True))
    order, lock = [], threading.Lock()
    submit, refresh = sess.pipeline.submit, sess.bs.refresh_caches

    def spy_submit(out, marks, **kw):
        with lock:
            order.append(("submit", out.index))
        return submit(out, marks, **kw)

    def spy_refresh(out):
        with lock:
            order.append(("refresh", out.index))
        return refresh(out)

    sess.pipeline.submit, sess.bs.refresh_caches = spy_submit, spy_refresh
    blocks = list(sess.run(ctx, seed=3))
    n = comps.profile.stream.blocks
    assert order == [(k, i) for i in range(n) for k in ("submit", "refresh")]
    assert all(b.times["dit_context"] > 0 and b.times["dit"] >= b.times["dit_context"] for b in blocks)


def test_a_stream_that_fails_in_its_context_pass_stops_cleanly(comps, ctx):
    """An error between submit and seal: the error reaches the caller, no worker thread is left waiting
    for the block's seal, and the session streams again afterwards."""
    sess = StreamSession(comps, comps.profile, decoders=DecoderOptions(overlap=True))
    refresh = sess.bs.refresh_caches

    def boom(out):
        if out.index == 1:
            raise RuntimeError("context pass failed")
        return refresh(out)

    sess.bs.refresh_caches = boom
    with pytest.raises(RuntimeError, match="context pass failed"):
        list(sess.run(ctx, seed=3))
    assert sess.pipeline._threads == [] and sess.pipeline._unsealed == []
    assert not [t for t in threading.enumerate() if t.name.startswith("hallolive-")]
    sess.bs.refresh_caches = refresh  # the failed block's pending pass goes with its stream (start())
    assert len(list(sess.run(ctx, seed=3))) == comps.profile.stream.blocks


def test_block_stream_refuses_a_block_before_the_last_ones_caches_are_refreshed():
    p = load_profile("tiny")
    dit = tiny_dit(profile=p)
    nv, na, ctx = tiny_inputs(p, 2)
    bs = BlockStream(dit, p, blocks=2)
    bs.start(ctx)
    plans = list(bs.policy.plans())
    out = bs.denoise_block(plans[0], nv[:, :2], na[:, :10], TorchNoise(1))
    with pytest.raises(RuntimeError, match="block 0's caches were not refreshed"):
        bs.denoise_block(plans[1], nv[:, 2:4], na[:, 10:20], TorchNoise(1))
    bs.refresh_caches(out)
    with pytest.raises(RuntimeError, match="once"):
        bs.refresh_caches(out)
    bs.denoise_block(plans[1], nv[:, 2:4], na[:, 10:20], TorchNoise(1))  # now it may go on


def test_pipeline_refuses_to_finish_with_an_unsealed_block(comps):
    p = comps.profile
    pipe = DecodePipeline(comps, p, overlap=False)
    pipe.start()
    s = p.stream
    out = BlockOutput(0, torch.randn(1, s.latent_frames_per_block, 48, p.video.latent_height, p.video.latent_width),
                      torch.randn(1, s.audio_tokens_per_block, 20), torch.zeros(1, 0, 20),
                      next(choose_policy(p, None).plans()))
    m = pipe.clock.mark()
    job = pipe.submit(out, BlockMarks(dit_start=m, context=(m, m), dit_end=m), sealed=False)
    assert pipe.ready() == []  # decoded, not written: its marks are not final
    with pytest.raises(RuntimeError, match="never sealed"):
        pipe.finish()
    pipe.seal(job)
    (b,) = pipe.finish()
    assert b.index == 0 and b.frames.shape[0] == p.pixel_frames(s.latent_frames_per_block, first_block=True)


class _EventClock:
    """CUDA-event semantics on a CPU, one stream: a mark is complete only once it, or a later mark, has
    been waited on (``wait`` / ``at_s``); ``ms`` between marks not complete raises, as
    ``cudaEventElapsedTime`` does (cudaErrorNotReady)."""

    def __init__(self):
        import time

        self._now, self.t0, self.n, self.done_upto, self.times = time.perf_counter, 0.0, 0, -1, {}

    def start(self):
        self.t0, self.done_upto = self._now(), self.n - 1

    def mark(self):
        self.n += 1
        self.times[self.n - 1] = self._now()
        return self.n - 1

    def now_s(self):
        return self._now() - self.t0

    def wait(self, m):
        self.done_upto = max(self.done_upto, m)

    def at_s(self, m, device):
        self.wait(m)
        return self.times[m] - self.t0

    def ms(self, a, b):
        if max(a, b) > self.done_upto:
            raise RuntimeError("cudaErrorNotReady: elapsed time of an event not yet completed")
        return (self.times[b] - self.times[a]) * 1e3


@pytest.mark.parametrize("overlap", [False, True])
def test_block_times_wait_for_the_context_pass_before_reading_its_marks(comps, ctx, overlap):
    """The decode can finish before the DiT's context pass of the same block (one GPU: always when
    sequential; two GPUs: whenever the decoder is fast): the block's DiT times are read only after its last
    DiT mark is complete (a CUDA clock refuses elapsed times of events not yet reached)."""
    sess = StreamSession(comps, comps.profile, decoders=DecoderOptions(overlap=overlap))
    sess.pipeline.clock = _EventClock()
    blocks = list(sess.run(ctx, seed=3))
    assert [b.index for b in blocks] == list(range(comps.profile.stream.blocks))
    assert all(b.times["dit_context"] > 0 and b.times["dit"] >= b.times["dit_steps"] for b in blocks)
