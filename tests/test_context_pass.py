"""The lean t = 0 context pass (``DualStreamDiT.forward(context=True)``, ``BlockStream.lean_context``):
it skips what cannot reach a cache, and the caches it leaves are BIT-identical to the full forward's.

Bit-identical because what it computes is computed by the same ops, in the same order, on the same
inputs (``model/dual_layer.py``): only whole sub-computations whose results no cache reads are left out.
Checked in fp32 and bf16, per block, over append and rolling (ring-wrapping, re-basing) streams, and for
every backend that runs the PyTorch forward (eager here; cudagraph / compiled under ``cuda``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hallolive_rt.options import DecoderOptions, DiTOptions
from hallolive_rt.cache_policy import AppendPolicy, RollingPolicy
from hallolive_rt.model.dual_layer import context_parts
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream
from tests.dit_fixtures import tiny_dit, tiny_inputs
from tests.test_fast_paths import _OpLog

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _policy(profile, kind: str):
    if kind == "append":
        return AppendPolicy(profile, 3)
    # 5 blocks through a 2-block ring after a 1-block sink, re-based every few blocks: wraps and rotates
    return RollingPolicy(profile, sink_blocks=1, window_blocks=2, audio_history_tokens=10, blocks=5,
                         max_positions=20)


def _caches_per_block(dit, profile, policy, lean: bool, dtype):
    n = policy.blocks
    nv, na, ctx = tiny_inputs(profile, n, dtype=dtype)
    fb, nt = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    bs = BlockStream(dit, profile, blocks=n, policy=policy)
    bs.lean_context = lean
    out = []
    for blk in bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * nt:(i + 1) * nt],
                      TorchNoise(5), record=True):
        out.append(({k: v.clone() for k, v in bs.state.tensors().items()}, blk))
    return out


@pytest.mark.parametrize("kind", ["append", "rolling"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_context_caches_are_bit_identical_to_the_full_pass(tiny_profile, dtype, kind):
    prof = tiny_profile.with_overrides(dtype=DTYPES[dtype])
    dit = tiny_dit(dtype=dtype, profile=prof)
    policy = _policy(prof, kind)
    if kind == "rolling":
        plans = list(policy.plans())
        slots = [p.video_slot for p in plans]
        assert any(p.rebase_frames for p in plans) and len(set(slots)) < len(slots)  # re-bases and wraps
    full = _caches_per_block(dit, prof, policy, False, dtype)
    lean = _caches_per_block(dit, prof, policy, True, dtype)
    assert len(full) == len(lean) == policy.blocks
    for i, ((cf, bf), (cl, bl)) in enumerate(zip(full, lean)):
        for name in cf:
            assert torch.equal(cf[name], cl[name]), f"block {i}: {name} differs after the lean context pass"
        assert torch.equal(bf.video, bl.video) and torch.equal(bf.audio, bl.audio), f"block {i} output"
        ctx_full, ctx_lean = bf.records[-1], bl.records[-1]
        assert ctx_full.step == ctx_lean.step == 4 and ctx_full.flow_v is not None
        assert ctx_lean.flow_v is None and ctx_lean.flow_a is None  # no head ran


def test_one_context_forward_from_the_same_state(tiny_profile):
    """Directly: one full and one lean t = 0 forward from a copy of the same mid-stream state."""
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 2)
    bs = BlockStream(dit, tiny_profile, blocks=2)
    bs.start(ctx)
    plans = list(bs.policy.plans())
    bs.run_block(plans[0], nv[:, :2], na[:, :10], TorchNoise(1))
    plan = plans[1]
    bs.cursor.set(plan)
    xv, xa = nv[:, 2:4], torch.cat([na[:, :10], na[:, 10:20]], 1)
    t0v, t0a = torch.zeros(1, 2), torch.zeros(1, plan.audio_len)
    start = {k: v.clone() for k, v in bs.state.tensors().items()}
    with torch.no_grad():
        flows = bs.eager_step(xv, xa, t0v, t0a, plan)
        after_full = {k: v.clone() for k, v in bs.state.tensors().items()}
        for k, v in bs.state.tensors().items():
            v.copy_(start[k])
        lean = bs.eager_step(xv, xa, t0v, t0a, replace(plan, context=True))
    assert flows[0] is not None and lean == (None, None)
    for k, v in bs.state.tensors().items():
        assert torch.equal(v, after_full[k]), k
    assert not torch.equal(after_full["video_k"], start["video_k"])  # the pass did write this block's rows


def test_context_parts_and_the_work_they_skip(tiny_profile):
    """The plan of the skipped work, and that the lean pass really runs fewer GEMMs (per stream and layer:
    layer L-2 skips audio q/o of the cross-attention and the audio FFN (4 GEMMs), layer L-1 skips the audio
    self-attention (4), audio cross q/o + FFN (4), the video cross-attention q/k/v/o + FFN (6); plus the two
    heads)."""
    assert context_parts(1) == ["cache_only"]
    assert context_parts(2) == ["no_audio_tail", "cache_only"]
    assert context_parts(30) == ["full"] * 28 + ["no_audio_tail", "cache_only"]
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 1)
    bs = BlockStream(dit, tiny_profile, blocks=1)
    bs.start(ctx)
    plan = next(bs.policy.plans())
    bs.cursor.set(plan)
    args = (nv[:, :2], na[:, :plan.audio_len], torch.zeros(1, 2), torch.zeros(1, plan.audio_len))
    counts = {}
    for lean in (False, True):
        with _OpLog() as log, torch.no_grad():
            bs.eager_step(*args, replace(plan, context=lean))
        counts[lean] = log.ops["aten.addmm.default"]
    assert counts[False] - counts[True] == 4 + (4 + 4 + 6) + 2, counts


def test_session_runs_the_lean_pass_through_its_backend_and_records_it(tiny_profile):
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.session import StreamSession

    comps = load_components(tiny_profile, None, with_text=False)
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    runs = {}
    for lean in (False, True):
        sess = StreamSession(comps, tiny_profile, dit=DiTOptions(lean_context=lean), decoders=DecoderOptions(overlap=False), blocks=2)
        seen = []
        step = sess._backend_step

        def spy(xv, xa, vt, at, plan, _step=step, _seen=seen):
            out = _step(xv, xa, vt, at, plan)
            _seen.append((plan.context, out[0] is None))
            return out

        sess._backend_step = spy
        runs[lean] = list(sess.run(ctx, seed=3))
        assert sess.describe()["lean_context"] is lean
        # per block: 4 denoising steps with flows, then the context pass (lean: context plan, no flow)
        assert seen == [(False, False)] * 4 + [(lean, lean)] + [(False, False)] * 4 + [(lean, lean)]
    for a, b in zip(runs[False], runs[True]):
        assert (a.frames == b.frames).all() and (a.audio == b.audio).all()


def test_lean_context_is_refused_for_compiled_artifacts():
    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.profile import load_profile
    from hallolive_rt.runtime.levers import check_dit_options

    p = load_profile("tiny")
    cfg = load_fusion_config(p.video_config, p.audio_config)
    for backend in ("aoti", "tensorrt"):
        with pytest.raises(ValueError, match=f"which the {backend} backend does not run"):
            check_dit_options(DiTOptions(lean_context=True), backend, "cpu", torch.float32, cfg)
    for backend in ("eager", "cudagraph", "compiled"):
        check_dit_options(DiTOptions(lean_context=True), backend, "cpu", torch.float32, cfg)


def test_exports_keep_the_full_forward(tiny_profile):
    """Exported DiT graphs serve both the denoising steps and the context pass (one variant per static
    shape, flows + caches out), so they trace the default full forward: context=False."""
    from hallolive_rt.export.contracts import contracts_for
    from hallolive_rt.export.dit import dit_module_for

    contract = contracts_for(tiny_profile)["dit"]
    v = contract.variants[0]
    out = dit_module_for(tiny_dit(), contract, v, functional=True)(*v.sample_inputs(seed=1))
    assert [tuple(t.shape) for t in out] == [s.shape for s in v.outputs]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cudagraph", "compiled"])
def test_cuda_backends_capture_and_replay_the_lean_pass(backend):
    """Graph backends capture a second graph per variant for the lean pass; the stream's caches and
    committed latents equal the eager lean stream's within the bf16 bound of the cudagraph test."""
    from hallolive_rt.profile import load_profile
    from hallolive_rt.runtime.backends import get_backend

    p = load_profile("tiny").with_overrides(dtype="bfloat16")
    dit = tiny_dit(dtype=torch.bfloat16, profile=p).cuda()
    dit.reset_rope()
    nv, na, ctx = (t.cuda() for t in tiny_inputs(p, 3, dtype=torch.bfloat16))

    def run(be):
        bs = BlockStream(dit, p, blocks=3, device="cuda")
        bs.lean_context = True
        if be is not None:
            be.prepare(bs, list(bs.policy.plans()))
            bs.step_fn = be.step
        outs = list(bs.run(ctx, lambda i: nv[:, 2 * i:2 * i + 2], lambda i: na[:, 10 * i:10 * i + 10],
                           TorchNoise(7, "cuda")))
        return outs, {k: v.clone() for k, v in bs.state.tensors().items()}

    ref, ref_caches = run(None)
    be = get_backend(backend)
    got, caches = run(be)
    assert sum("lean context" in v for v in be.variants()) == 3
    for r, g in zip(ref, got):  # replayed / inductor-fused kernels may round bf16 differently
        scale = r.video.float().abs().max().item()
        assert (g.video.float() - r.video.float()).abs().max().item() < 5e-2 * scale, r.index
        assert (g.audio.float() - r.audio.float()).abs().max().item() < 5e-2 * scale, r.index
    for k in ref_caches:
        scale = ref_caches[k].float().abs().max().item()
        assert (caches[k].float() - ref_caches[k].float()).abs().max().item() < 5e-2 * scale, k


def test_bench_counts_the_lean_pass_flops(tiny_profile):
    """bench's achieved TFLOP/s of the context stage divide by the work the lean pass really does."""
    from hallolive_rt.runtime.bench import FlopCounts

    plan = next(AppendPolicy(tiny_profile, 1).plans())
    full = FlopCounts(tiny_profile).dit_block(plan, 4)
    lean = FlopCounts(tiny_profile, lean_context=True).dit_block(plan, 4)
    assert lean["dit_steps"] == full["dit_steps"] == 4 * full["dit_context"]
    assert 0 < lean["dit_context"] < full["dit_context"] and lean["dit"] == lean["dit_steps"] + lean["dit_context"]
