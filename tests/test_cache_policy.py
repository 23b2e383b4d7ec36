"""Cache policies: rolling equals the released append policy when its window covers the stream,
re-basing positions is exact, and an endless stream runs in flat memory and time."""

from __future__ import annotations

import time

import torch

from hallolive_rt.cache_policy import AppendPolicy, RollingPolicy, choose_policy
from hallolive_rt.model.rope import ROPE_POSITIONS
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream, generate
from tests.dit_fixtures import tiny_dit, tiny_inputs


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_rolling_with_a_window_covering_the_stream_equals_append(tiny_profile):
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 3)
    ref = generate(dit, tiny_profile, ctx, nv, na, TorchNoise(5), record=True)
    roll = RollingPolicy(tiny_profile, sink_blocks=0, window_blocks=3, audio_history_tokens=20, blocks=3)
    got = generate(dit, tiny_profile, ctx, nv, na, TorchNoise(5), record=True, policy=roll)
    for a, b in zip(got.records, ref.records):
        if a.x0_v is not None:
            assert _max_rel(a.x0_v, b.x0_v) < 1e-5 and _max_rel(a.x0_a, b.x0_a) < 1e-5, (a.block, a.step)


def test_rebasing_positions_is_exact_without_sink(tiny_profile):
    """With no sink every cached key turns by the same delta, so attention is unchanged: a stream forced
    to re-base every few blocks equals one that never does (RoPE composes; positions are relative)."""
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 8)
    kw = dict(sink_blocks=0, window_blocks=3, audio_history_tokens=20, blocks=8)
    plain = RollingPolicy(tiny_profile, **kw)
    forced = RollingPolicy(tiny_profile, max_positions=40, **kw)
    plans = list(forced.plans())
    assert sum(p.rebase_frames > 0 for p in plans) >= 2
    assert all(p.frame0 + 2 <= 40 and p.audio0 >= 0 and p.audio0 + p.audio_len <= 40 for p in plans)
    a = generate(dit, tiny_profile, ctx, nv, na, TorchNoise(2), policy=plain)
    b = generate(dit, tiny_profile, ctx, nv, na, TorchNoise(2), policy=forced)
    assert _max_rel(b.video, a.video) < 1e-4 and _max_rel(b.audio, a.audio) < 1e-4


def test_positions_never_leave_the_tables_for_a_long_full_size_stream():
    p = load_profile("hallolive-512x992")
    pol = choose_policy(p, 5000)
    assert isinstance(pol, RollingPolicy) and isinstance(choose_policy(p, 5), AppendPolicy)
    fb = p.stream.latent_frames_per_block
    variants = set()
    for plan in pol.plans():
        assert 0 <= plan.frame0 and plan.frame0 + fb <= ROPE_POSITIONS
        assert 0 <= plan.audio0 and plan.audio0 + plan.audio_len <= ROPE_POSITIONS
        variants.add(plan.variant)
    assert len(variants) <= pol.sink + pol.window  # warm-up variants, then one steady shape


def test_sixty_block_stream_runs_in_flat_memory_and_time(tiny_profile):
    dit = tiny_dit()
    bs = BlockStream(dit, tiny_profile, blocks=60)
    assert isinstance(bs.policy, RollingPolicy)
    g = torch.Generator().manual_seed(0)
    v = tiny_profile.video
    vn = [torch.randn(1, 2, 48, v.latent_height, v.latent_width, generator=g) for _ in range(60)]
    an = [torch.randn(1, 10, 20, generator=g) for _ in range(60)]
    ctx = torch.randn(1, 512, tiny_profile.text.text_dim, generator=g)
    state_bytes = bs.state.nbytes()
    times, hist_len = [], []
    start = time.perf_counter()
    for out in bs.run(ctx, vn.__getitem__, an.__getitem__, TorchNoise(0)):
        now = time.perf_counter()
        times.append(now - start)
        start = now
        hist_len.append(bs._audio_hist.shape[1])
        assert torch.isfinite(out.video).all() and torch.isfinite(out.audio).all()
    assert len(times) == 60 and bs.state.nbytes() == state_bytes  # caches never grow
    assert max(hist_len) == bs.policy.hist  # bounded audio history
    early = sorted(times[8:20])[6]
    late = sorted(times[48:60])[6]
    print(f"60-block tiny stream: state {state_bytes} B constant, audio history <= {max(hist_len)} tokens, "
          f"median block time blocks 8-19 {early * 1e3:.1f} ms vs 48-59 {late * 1e3:.1f} ms")
    assert late < 1.6 * early + 0.01
