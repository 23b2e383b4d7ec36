"""A DiT block step never syncs the host: it compiles as ONE graph (fullgraph=True) on CPU and gives
the eager result. Any .item(), .tolist(), boolean-mask index or data-dependent shape would break it."""

from __future__ import annotations

import torch

from hallolive_rt.stream import BlockStream
from tests.conftest import assert_close
from tests.dit_fixtures import tiny_dit, tiny_inputs


def test_block_step_compiles_fullgraph_and_matches_eager(tiny_profile):
    torch._dynamo.reset()
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 3)
    bs = BlockStream(dit, tiny_profile, blocks=3)
    bs.start(ctx)
    plans = list(bs.policy.plans())
    plan = plans[1]  # a block with history: cache rows written at a device offset
    xv = nv[:, 2:4]
    xa = na[:, :plan.audio_len]
    vt = torch.full((1, 2), 937.5)
    at = torch.cat([torch.zeros(1, 10), torch.full((1, 10), 937.5)], dim=1)

    def step(xv, xa, vt, at):
        return bs.eager_step(xv, xa, vt, at, plan)

    bs.cursor.set(plan)
    state0 = {k: v.clone() for k, v in bs.state.tensors().items()}
    ev, ea = step(xv, xa, vt, at)
    eager_cache = bs.state.video_k.clone()
    for k, v in bs.state.tensors().items():
        v.copy_(state0[k])
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    cv, ca = compiled(xv, xa, vt, at)
    assert_close(cv, ev, rtol=1e-4, atol=1e-5, what="compiled video flow")
    assert_close(ca, ea, rtol=1e-4, atol=1e-5, what="compiled audio flow")
    assert_close(bs.state.video_k, eager_cache, rtol=1e-4, atol=1e-5, what="cache written in-graph")
    # the same compiled graph serves another block: only the device cursor changes, no recompile
    other = plans[2]
    bs.cursor.set(other)
    n_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(xv, xa, vt, at)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == n_before
    # rows of the cursor's slot were written: block 2's rows now hold values
    assert bs.state.video_k[:, :, other.video_slot:other.video_slot + 12].abs().sum() > 0
