"""Backend registry and contract; the cudagraph backend on a GPU (marked cuda: skipped without one)."""

from __future__ import annotations

import pytest
import torch

from hallolive_rt.options import DiTOptions
from hallolive_rt.cache_policy import AppendPolicy
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream
from hallolive_rt.runtime.backends import (BACKENDS, Backend, BackendUnavailable, distinct_variants, get_backend,
                                           variant_name)
from tests.conftest import assert_close
from tests.dit_fixtures import tiny_dit, tiny_inputs


def test_registry_names_and_errors():
    assert BACKENDS == ("eager", "cudagraph", "compiled", "aoti", "tensorrt")
    from hallolive_rt.cli import Backend as CliBackend

    assert tuple(b.value for b in CliBackend) == ("auto", *BACKENDS)  # every backend is selectable from the CLI
    eager = get_backend("eager")
    assert isinstance(eager, Backend) and eager.name == "eager"
    with pytest.raises(ValueError, match="unknown backend 'warp'.*eager, cudagraph, compiled, aoti, tensorrt"):
        get_backend("warp")


@pytest.mark.parametrize("name", ["aoti", "tensorrt"])
def test_optional_backends_import_lazily_and_fail_clearly(name):
    try:
        b = get_backend(name)
    except BackendUnavailable as e:
        assert str(e)  # says what is missing
    except TypeError:
        pytest.skip(f"{name} backend needs constructor options (artifact paths)")
    else:
        assert b.name == name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cudagraph_without_cuda_names_what_is_missing():
    for name in ("cudagraph", "compiled"):
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU.*--backend eager"):
            get_backend(name)


def test_variants_largest_first_and_eager_equals_stream(tiny_profile):
    plans = list(AppendPolicy(tiny_profile, 3).plans())
    vs = distinct_variants(plans)
    assert vs == [(30, 36), (20, 24), (10, 12)] and variant_name(vs[0]) == "audio_len=30,video_kv_len=36"
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 3)
    fb, n = 2, 10

    def run(step_backend):
        bs = BlockStream(dit, tiny_profile, blocks=3)
        if step_backend is not None:
            step_backend.prepare(bs, plans)
            bs.step_fn = step_backend.step
        return [o.video for o in bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb],
                                         lambda i: na[:, i * n:(i + 1) * n], TorchNoise(7))]

    be = get_backend("eager")
    for a, b in zip(run(None), run(be)):
        assert torch.equal(a, b)
    assert len(be.variants()) == 3 and "3 variant(s)" in be.describe()


# ---- GPU ------------------------------------------------------------------------------------------------

def _gpu_stream(profile, backend_name, blocks, dit, ctx, nv, na):
    fb, n = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    bs = BlockStream(dit, profile, blocks=blocks, device="cuda")
    plans = list(bs.policy.plans())
    be = get_backend(backend_name)
    be.prepare(bs, plans)  # set-up may synchronize (it times the first warm-up call); replay may not
    bs.step_fn = be.step
    outs = list(bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * n:(i + 1) * n],
                       TorchNoise(7, "cuda")))
    return outs, be


@pytest.mark.cuda
def test_cudagraph_equals_eager_bf16_over_four_blocks():
    p = load_profile("tiny").with_overrides(dtype="bfloat16", blocks=4)
    dit = tiny_dit(dtype=torch.bfloat16, profile=p).cuda()
    dit.reset_rope()
    nv, na, ctx = (t.cuda() for t in tiny_inputs(p, 4, dtype=torch.bfloat16))
    ref, _ = _gpu_stream(p, "eager", 4, dit, ctx, nv, na)
    got, be = _gpu_stream(p, "cudagraph", 4, dit, ctx, nv, na)
    assert len(be.variants()) == 4
    for r, g in zip(ref, got):
        # bf16: same kernels, replayed; allow bf16 rounding differences from kernel selection
        scale = r.video.float().abs().max().item()
        assert_close(g.video.float(), r.video.float(), rtol=0, atol=5e-2 * scale, what=f"video block {r.index}")
        assert_close(g.audio.float(), r.audio.float(), rtol=0, atol=5e-2 * scale, what=f"audio block {r.index}")


@pytest.mark.cuda
def test_cudagraph_replay_has_no_host_sync():
    p = load_profile("tiny").with_overrides(dtype="bfloat16")
    dit = tiny_dit(dtype=torch.bfloat16, profile=p).cuda()
    dit.reset_rope()
    bs = BlockStream(dit, p, blocks=3, device="cuda")
    plans = list(bs.policy.plans())
    be = get_backend("cudagraph")
    be.prepare(bs, plans)  # warm-up + capture (may synchronize: it times the first warm-up call)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for plan in plans:  # cursor fill_ + input copy_ + replay: nothing may sync
            bs.cursor.set(plan)
            s = p.stream
            xv = torch.randn(1, s.latent_frames_per_block, 48, p.video.latent_height, p.video.latent_width,
                             device="cuda", dtype=torch.bfloat16)
            xa = torch.randn(1, plan.audio_len, 20, device="cuda", dtype=torch.bfloat16)
            vt = torch.full((1, s.latent_frames_per_block), 625.0, device="cuda")
            at = torch.full((1, plan.audio_len), 625.0, device="cuda")
            fv, fa = be.step(xv, xa, vt, at, plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(fv.float()).all() and fa.shape == (1, plans[-1].audio_len, 20)


@pytest.mark.cuda
def test_cudagraph_session_end_to_end_matches_eager():
    import numpy as np

    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.session import StreamSession

    p = load_profile("tiny").with_overrides(dtype="bfloat16")
    c = load_components(p, dit_device="cuda", vae_device="cuda", seed=0, with_text=False)
    ctx = 0.5 * torch.randn(1, 512, 64, device="cuda", dtype=torch.bfloat16)
    a = list(StreamSession(c, p, dit=DiTOptions(backend="eager")).run(ctx, seed=0))
    b = list(StreamSession(c, p, dit=DiTOptions(backend="cudagraph")).run(ctx, seed=0))
    for x, y in zip(a, b):
        assert x.frames.shape == y.frames.shape
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).mean() < 2.0  # uint8 levels, bf16 noise
