"""The cudagraph backend's capture and replay logic, in CI, on a CPU (tests/fake_cuda_graphs.py).

A CUDA graph freezes every Python value of the captured step and re-reads only device memory; these tests
run ``CudaGraphBackend`` with an emulated graph that does exactly that, against the eager step, bit for
bit: the released clip (append: one block per variant, so only values that differ between variants are
tested there), a stream past it (rolling: blocks share a graph, so any value frozen at capture that
changes from block to block shows; ring writes, RoPE re-basing between blocks),
the lean context pass (a second graph per variant), and a whole ``StreamSession`` with its decoders. On a
GPU the same comparisons are `cuda` tests (tests/test_backends.py) and the GPU session's (a) phase.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hallolive_rt.options import DiTOptions
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream
from tests.dit_fixtures import tiny_dit, tiny_inputs
from tests.fake_cuda_graphs import FakeGraph, HostSyncInCapture, emulate_cuda_graphs, fake_graph


def test_fake_graph_freezes_python_values_and_rereads_memory():
    x = torch.ones(3)
    k = 2.0
    g = FakeGraph()
    with fake_graph(g):
        y = x * k + x.sum()
        x.add_(0)  # an in-place op on an input replays in place
    x.fill_(3.0)
    k = 5.0  # noqa: F841  (a Python value changed after capture: the graph keeps 2.0)
    g.replay()
    assert torch.equal(y, torch.full((3,), 3.0 * 2.0 + 9.0)) and g.replays == 1
    with pytest.raises(HostSyncInCapture, match="_local_scalar_dense"):
        with fake_graph(FakeGraph()):
            float(x.sum())  # .item(): a host sync, refused as a real capture refuses it


def _stream_latents(dit, p, blocks, ctx, nv, na, backend=None, lean=False):
    bs = BlockStream(dit, p, blocks=blocks)
    bs.lean_context = lean
    if backend is not None:
        backend.prepare(bs, list(bs.policy.plans()))
        bs.step_fn = backend.step
    fb, n = p.stream.latent_frames_per_block, p.stream.audio_tokens_per_block
    outs = list(bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * n:(i + 1) * n],
                       TorchNoise(7)))
    return bs, [(o.video.clone(), o.audio.clone()) for o in outs]


@pytest.mark.parametrize("blocks,lean", [(3, False), (8, False), (8, True)], ids=["append", "rolling", "rolling-lean"])
def test_emulated_cudagraph_equals_eager_bit_for_bit(monkeypatch, blocks, lean):
    from hallolive_rt.runtime.backends.cudagraph import CudaGraphBackend

    p = load_profile("tiny")
    dit = tiny_dit(profile=p)
    nv, na, ctx = tiny_inputs(p, blocks)
    ref_bs, ref = _stream_latents(dit, p, blocks, ctx, nv, na, lean=lean)
    assert ref_bs.policy.name == ("append" if blocks <= p.stream.blocks else "rolling")
    emulate_cuda_graphs(monkeypatch)
    be = CudaGraphBackend()
    bs, got = _stream_latents(dit, p, blocks, ctx, nv, na, be, lean=lean)
    variants = {pl.variant for pl in bs.policy.plans()}
    assert len(be._graphs) == len(variants) * (2 if lean else 1)
    assert all(c.graph.replays > 0 for c in be._graphs.values()), "every captured graph serves some block"
    for i, ((v, a), (rv, ra)) in enumerate(zip(got, ref)):
        assert torch.equal(v, rv) and torch.equal(a, ra), f"block {i}"
    for k, t in ref_bs.state.tensors().items():  # and the caches the next block would read
        assert torch.equal(bs.state.tensors()[k], t), k


def test_emulated_cudagraph_session_frames_equal_eager(monkeypatch):
    """The whole session (DiT through the backend, then both decoders) in bf16, past the released clip
    (rolling: blocks share graphs): the emulated cudagraph session's frames and audio equal eager's."""
    from hallolive_rt.runtime.backends.cudagraph import CudaGraphBackend
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.session import StreamSession

    p = load_profile("tiny").with_overrides(dtype="bfloat16")
    c = load_components(p, seed=0, with_text=False)
    ctx = 0.5 * torch.randn(1, p.text.text_len, p.text.text_dim, generator=torch.Generator().manual_seed(3))
    ctx = ctx.to(torch.bfloat16)
    ref = list(StreamSession(c, p, dit=DiTOptions(backend="eager"), blocks=5).run(ctx, seed=0))
    emulate_cuda_graphs(monkeypatch)
    sess = StreamSession(c, p, backend=CudaGraphBackend(), blocks=5)
    assert sess.describe()["backend"] == "cudagraph" and sess.describe()["policy"] == "rolling"
    got = list(sess.run(ctx, seed=0))
    assert [b.index for b in got] == [b.index for b in ref] == list(range(5))
    for a, b in zip(got, ref):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio), f"block {a.index}"
