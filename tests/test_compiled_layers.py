"""The compiled DiT step: ``dual_layer`` compiled ONCE and shared by every layer (regional compilation,
``hallolive_rt.model.compile``), against the eager forward; the ``compiled`` backend on a GPU.

CPU (inductor's C++ backend), 3 tiny blocks (5 forwards each, 2 layers per forward: 30 layer calls per
stream). The stream uses a rolling policy with a one-block ring (sink 0, no audio history), so all blocks
share ONE static variant: the whole stream must compile exactly one graph. Tolerances, every forward's
x0 and the committed latents, max |diff| / max |ref| (mean likewise):
  fp32 < 1e-5: inductor reorders float32 reductions only;
  bf16 < 5e-2 max, < 1e-2 mean (the bf16 bound of the stream reference test): inductor keeps fused
  elementwise chains in float32 where eager rounds every op to bf16, and 15 forwards compound that.
The layer parts of a lean context pass and the float8 Linears trace into the same function (checked with
the cheap ``aot_eager`` backend: same graphs, no C++ build).
"""

from __future__ import annotations

import pytest
import torch

from hallolive_rt.cache_policy import AppendPolicy, RollingPolicy
from hallolive_rt.model.compile import LayerCompiler
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate
from tests.dit_fixtures import tiny_dit, tiny_inputs

BLOCKS = 3
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 1e-2)}  # (max-rel, mean-rel)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _rel(a, b):
    d = (a.double() - b.double()).abs()
    return (d.max() / b.double().abs().max()).item(), (d.mean() / b.double().abs().mean()).item()


def _one_variant_policy(profile):
    pol = RollingPolicy(profile, sink_blocks=0, window_blocks=1, audio_history_tokens=0, blocks=BLOCKS)
    assert len({p.variant for p in pol.plans()}) == 1
    return pol


def _stream(dit, profile, dtype, **kw):
    nv, na, ctx = tiny_inputs(profile, BLOCKS, dtype=dtype)
    return generate(dit, profile, ctx, nv, na, TorchNoise(7), record=True, policy=_one_variant_policy(profile), **kw)


def _compare(got, ref, tol, what):
    pairs = [(f"forward {i} {n}", a, b) for i, (g, r) in enumerate(zip(got.records, ref.records))
             for n, a, b in (("x0_v", g.x0_v, r.x0_v), ("x0_a", g.x0_a, r.x0_a)) if b is not None]
    pairs += [("committed video", got.video, ref.video), ("committed audio", got.audio, ref.audio)]
    worst = (0.0, 0.0)
    for name, a, b in pairs:
        mx, mean = _rel(a, b)
        worst = (max(worst[0], mx), max(worst[1], mean))
        assert mx < tol[0] and mean < tol[1], f"{what} {name}: max-rel {mx:.2e}, mean-rel {mean:.2e}"
    print(f"{what}: worst max-rel {worst[0]:.2e}, mean-rel {worst[1]:.2e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_layers_equal_eager_and_compile_once_for_all_layers(tiny_profile, dtype):
    from torch._dynamo.utils import counters

    prof = tiny_profile.with_overrides(dtype=DTYPES[dtype])
    dit = tiny_dit(dtype=dtype, profile=prof)
    ref = _stream(dit, prof, dtype)
    counters.clear()
    comp = LayerCompiler()
    with comp.active(dit):
        got = _stream(dit, prof, dtype)
    assert dit.layer_fn is None  # restored: the DiT runs eagerly again
    n_layers = dit.cfg.num_layers
    assert n_layers >= 2 and len(got.records) == BLOCKS * 5
    # 30 layer calls, one static variant: ONE graph, no recompile, no graph break (fullgraph)
    assert comp.graphs == 1, comp.stats()
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    assert comp.stats()["compile_s"] > 0
    _compare(got, ref, TOL[dtype], f"inductor {DTYPES[dtype]}")


def test_lean_context_and_fp8_layers_trace_fullgraph_one_graph_per_part(tiny_profile):
    """aot_eager (functionalized graphs run by aten ops, nothing generated), on a float8 DiT streaming with
    the lean context pass: the lean pass adds one graph per layer part (no_audio_tail, cache_only) and
    nothing else, and the float8 Linears trace in-graph (fullgraph: no break)."""
    from hallolive_rt.model.dual_layer import context_parts

    dit = tiny_dit()
    dit.quantize_fp8()
    ref = _stream(dit, tiny_profile, torch.float32, lean_context=True)
    comp = LayerCompiler("aot_eager")
    with comp.active(dit):
        got = _stream(dit, tiny_profile, torch.float32, lean_context=True)
    assert comp.graphs == len(set(context_parts(dit.cfg.num_layers)) | {"full"}) == 3, comp.stats()
    _compare(got, ref, (1e-5, 1e-5), "aot_eager, fp8, lean context")


def test_recompile_limit_is_an_error_not_a_silent_eager_fallback(tiny_profile):
    dit = tiny_dit()
    comp = LayerCompiler("aot_eager", max_graphs=1)
    with comp.active(dit), pytest.raises(Exception, match="(?i)recompile|cache_size|limit"):
        _stream(dit, tiny_profile, torch.float32, lean_context=True)  # needs 3 graphs


# ---- GPU: the compiled backend = the cudagraph backend with compiled layers ----------------------------------

def _gpu_setup(dtype=torch.bfloat16, blocks=3):
    from hallolive_rt.profile import load_profile

    p = load_profile("tiny").with_overrides(dtype=DTYPES[dtype], blocks=blocks)
    dit = tiny_dit(dtype=dtype, profile=p).cuda()
    dit.reset_rope()
    nv, na, ctx = (t.cuda() for t in tiny_inputs(p, blocks, dtype=dtype))
    return p, dit, nv, na, ctx


def _gpu_run(p, dit, nv, na, ctx, backend=None, lean=False):
    from hallolive_rt.stream import BlockStream

    bs = BlockStream(dit, p, device="cuda")
    bs.lean_context = lean
    if backend is not None:
        backend.prepare(bs, list(bs.policy.plans()))
        bs.step_fn = backend.step
    fb, na_ = p.stream.latent_frames_per_block, p.stream.audio_tokens_per_block
    return list(bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * na_:(i + 1) * na_],
                       TorchNoise(7, "cuda")))


@pytest.mark.cuda
@pytest.mark.parametrize("lean", [False, True])
def test_cuda_compiled_backend_equals_eager_replays_without_sync_and_reports_compile(lean):
    from hallolive_rt.runtime.backends import get_backend

    p, dit, nv, na, ctx = _gpu_setup()
    ref = _gpu_run(p, dit, nv, na, ctx, lean=lean)
    be = get_backend("compiled")
    got_first = _gpu_run(p, dit, nv, na, ctx, be, lean)  # prepare compiles + captures
    assert dit.layer_fn is None  # the graphs hold the compiled kernels; the module is eager again
    info = be.compile_info()
    variants = len({pl.variant for pl in AppendPolicy(p).plans()})
    assert info["compiled_graphs"] == variants * (3 if lean else 1), info
    assert info["compile_s"] > 0 and info["capture_s"] > 0 and "compiled layer graphs" in be.describe()
    for r, g in zip(ref, got_first):
        scale = r.video.float().abs().max().item()
        assert (g.video.float() - r.video.float()).abs().max().item() < 5e-2 * scale, r.index
        assert (g.audio.float() - r.audio.float()).abs().max().item() < 5e-2 * scale, r.index
    # replay (cursor fill_ + input copy_ + graph replay) never syncs the host
    from hallolive_rt.stream import BlockStream

    bs = BlockStream(dit, p, device="cuda")
    plans = list(bs.policy.plans())
    be2 = get_backend("compiled")
    be2.prepare(bs, plans)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for plan in plans:
            bs.cursor.set(plan)
            out = be2.step(nv[:, :2], torch.randn(1, plan.audio_len, 20, device="cuda", dtype=torch.bfloat16),
                           torch.full((1, 2), 625.0, device="cuda"), torch.full((1, plan.audio_len), 625.0,
                                                                                device="cuda"), plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(out[0].float()).all()


@pytest.mark.cuda
def test_cuda_compiled_fp8_backend_runs_scaled_mm_in_its_graphs():
    from hallolive_rt.runtime.backends import get_backend

    p, dit, nv, na, ctx = _gpu_setup()
    ref = _gpu_run(p, dit, nv, na, ctx)
    info = dit.quantize_fp8()
    if info["impl"] != "scaled_mm":
        pytest.skip(f"no row-wise float8 GEMM on this GPU: {info['emulated_because']}")
    got = _gpu_run(p, dit, nv, na, ctx, get_backend("compiled"))
    for r, g in zip(ref, got):  # fp8 vs bf16: the deviation table's tiny-preset bound
        mx, _ = _rel(g.video.float(), r.video.float())
        assert mx < 0.25, (r.index, mx)
