"""``forward_at``: one DiT forward of a stream (inputs -> flow, x0) equals the same forward recorded by
``generate(..., record=True)``, for denoising steps and the context pass, with and without lookahead."""

from __future__ import annotations

import pytest
import torch

from hallolive_rt.diagnose import forward_at
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate
from tests.dit_fixtures import tiny_dit, tiny_inputs

BLOCKS = 3
FIELDS = ("vid_in", "aud_in", "vid_t", "aud_t", "flow_v", "flow_a", "x0_v", "x0_a")


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(seed=2)


@pytest.mark.parametrize("future", [0, 5])
def test_one_forward_equals_the_recorded_stream(dit, tiny_profile, future):
    p = tiny_profile.with_overrides(future_audio_tokens=future)
    nv, na, ctx = tiny_inputs(p, BLOCKS)
    full = generate(dit, p, ctx, nv, na, TorchNoise(4), record=True)
    steps = len(p.stream.denoising_steps)
    assert len(full.records) == BLOCKS * (steps + 1)
    for block, step in ((0, 0), (1, 2), (2, steps - 1), (2, steps)):  # steps = the t=0 context pass
        rec = forward_at(dit, p, ctx, nv, na, seed=4, block=block, step=step)
        want = full.records[block * (steps + 1) + step]
        assert (rec.block, rec.step) == (want.block, want.step) == (block, step)
        for f in FIELDS:
            a, b = getattr(rec, f), getattr(want, f)
            if step == steps and f.startswith("x0"):
                assert a is None and b is None  # the context pass predicts no x0
                continue
            assert torch.equal(a, b), (block, step, f)  # the same loop, the same ops: bit-equal on CPU
        if step < steps:  # x0 is the flow applied to the input: x0 = x_t - sigma * v
            assert not torch.equal(rec.x0_v, rec.vid_in)
    # the audio history of block 2 holds 20 committed tokens, then the 10 + F window
    assert rec.aud_in.shape[1] == 2 * 10 + 10 + future


def test_noise_source_and_bad_coordinates(dit, tiny_profile):
    nv, na, ctx = tiny_inputs(tiny_profile, 2)
    a = forward_at(dit, tiny_profile, ctx, nv, na, TorchNoise(9), block=1, step=1)
    b = forward_at(dit, tiny_profile, ctx, nv, na, seed=9, block=1, step=1)
    assert torch.equal(a.flow_v, b.flow_v) and torch.equal(a.flow_a, b.flow_a)
    with pytest.raises(ValueError, match=r"block 2 is outside the stream: the noise holds blocks 0..1"):
        forward_at(dit, tiny_profile, ctx, nv, na, seed=0, block=2, step=0)
    with pytest.raises(ValueError, match=r"step 5 is outside 0..4 .* context pass as step 4"):
        forward_at(dit, tiny_profile, ctx, nv, na, seed=0, block=0, step=5)
    with pytest.raises(ValueError, match="exactly one of noise= .* or seed="):
        forward_at(dit, tiny_profile, ctx, nv, na, block=0, step=0)
    with pytest.raises(ValueError, match="not whole blocks"):
        forward_at(dit, tiny_profile, ctx, nv[:, :3], na, seed=0, block=0, step=0)
