"""The opt-in fast paths of the DiT forward against their references (the released-equivalent path):
fused projections (hallolive_rt/model/fused.py) and the SDPA kernel choice (hallolive_rt/model/attention.py).

Tolerances, fused vs unfused stream (3 tiny blocks, every forward's x0, max |diff| / max |x0|):
  fp32 < 1e-5: the GEMMs differ only in how the output columns are blocked;
  bf16 < 2e-2 max, < 2e-3 mean: bf16 activations can round differently once a GEMM's blocking changes,
  and a flipped bf16 rounding compounds over 4 steps x 3 blocks (0 measured on this CPU).
Attention kernels vs ``attention_reference``: fp32 rtol/atol 1e-5, bf16 2e-2 (one bf16 rounding of the output).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hallolive_rt.options import DiTOptions
from hallolive_rt.config import load_fusion_config
from hallolive_rt.model.attention import (ATTENTION_KERNELS, attention, attention_kernel, attention_reference,
                                          check_attention_kernel)
from hallolive_rt.model.dit import DualStreamDiT
from hallolive_rt.model.dit_weights import build_dit, init_random_
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream, generate
from tests.conftest import assert_close
from tests.dit_fixtures import SHARED, first_step, key_list, tiny_dit, tiny_inputs

FULL_PARAMS = 11_660_753_108
BLOCKS = 3
FP32_MAX_REL = 1e-5
BF16_MAX_REL, BF16_MEAN_REL = 2e-2, 2e-3
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GROUPS = {"self_attn": {"qkv": ("q", "k", "v")},
          "cross_attn": {"kv": ("k", "v"), "kv_fusion": ("k_fusion", "v_fusion")}}


def _rel(a, b):
    d = (a.double() - b.double()).abs()
    return (d.max() / b.double().abs().max()).item(), (d.mean() / b.double().abs().mean()).item()


def _stream_x0(dit, profile, dtype):
    nv, na, ctx = tiny_inputs(profile, BLOCKS, dtype=dtype)
    res = generate(dit, profile, ctx, nv, na, TorchNoise(7), record=True)
    return [(r.x0_v, r.x0_a) for r in res.records if r.x0_v is not None]


class _OpLog(TorchDispatchMode):
    """Counts every aten op a region runs."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _step_args(nv, na, plan):
    """Inputs of a first-block step at t = 937.5: xv, xa, vt, at."""
    t = 937.5
    return nv[:, :2], na[:, :plan.audio_len], torch.full((1, 2), t), torch.full((1, plan.audio_len), t)


def _fusable_layers(dit):
    for model in (dit.video_model, dit.audio_model):
        for blk in model.blocks:
            for attr, groups in GROUPS.items():
                yield getattr(blk, attr), groups


# ---- fused projections ------------------------------------------------------------------------------------

def test_fusing_keeps_names_shapes_values_and_aliases_one_weight():
    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    n_params = sum(p.numel() for p in dit.parameters())
    dit.fuse_projections()
    assert dit.projections_fused
    after = dit.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in dit.parameters()) == n_params  # the fused buffers are not parameters
    for mod, groups in _fusable_layers(dit):
        for group, members in groups.items():
            w, b = getattr(mod, f"{group}_weight"), getattr(mod, f"{group}_bias")
            row = 0
            for name in members:  # each member's parameters are row slices of the fused tensors
                lin = getattr(mod, name)
                assert lin.weight.data_ptr() == w[row].data_ptr() and lin.bias.data_ptr() == b[row:].data_ptr()
                row += lin.out_features
            assert row == w.shape[0] == b.shape[0]
    # in-place writes to a member (a reload by copy, re-initialisation) land in the fused weight
    init_random_(dit, seed=5)
    ref = tiny_dit(seed=5)
    x = torch.randn(1, 7, dit.cfg.video.dim)
    blk, rblk = dit.video_model.blocks[1].self_attn, ref.video_model.blocks[1].self_attn
    for got, want in zip(blk.qkv(x), rblk.qkv(x)):
        assert_close(got, want, rtol=1e-6, atol=1e-6, what="qkv after an in-place re-init")
    dit.unfuse_projections()
    assert not dit.projections_fused and not [k for k, _ in dit.named_buffers() if k.endswith(("_weight", "_bias"))]
    assert list(dit.state_dict()) == list(before)


def test_fused_forward_runs_one_gemm_per_group(tiny_profile):
    """Per layer and stream: q/k/v 3 -> 1 and fusion k/v 2 -> 1 GEMMs a step; text k/v 2 -> 1 per prompt."""
    dit = tiny_dit()
    nv, na, ctx = tiny_inputs(tiny_profile, 1)
    bs = BlockStream(dit, tiny_profile, blocks=1)
    plan = next(bs.policy.plans())
    gemms = {}
    for fused in (False, True):
        if fused:
            dit.fuse_projections()
        with _OpLog() as text:
            bs.start(ctx)
        bs.cursor.set(plan)
        with _OpLog() as step:
            bs.eager_step(*_step_args(nv, na, plan), plan)
        gemms[fused] = text.ops["aten.addmm.default"], step.ops["aten.addmm.default"]
    layers = 2 * dit.cfg.num_layers  # both streams
    assert gemms[True] == (gemms[False][0] - layers, gemms[False][1] - 3 * layers), gemms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_stream_matches_unfused_reference(tiny_profile, dtype):
    prof = tiny_profile.with_overrides(dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    dit = tiny_dit(dtype=dtype, profile=prof)
    ref = _stream_x0(dit, prof, dtype)
    dit.fuse_projections()
    got = _stream_x0(dit, prof, dtype)
    assert len(got) == len(ref) == BLOCKS * 4
    worst = 0.0
    for i, ((gv, ga), (rv, ra)) in enumerate(zip(got, ref)):
        for name, a, b in (("video", gv, rv), ("audio", ga, ra)):
            mx, mean = _rel(a, b)
            worst = max(worst, mx)
            if dtype == torch.float32:
                assert mx < FP32_MAX_REL, f"forward {i} {name}: max rel {mx:.2e}"
            else:
                assert mx < BF16_MAX_REL and mean < BF16_MEAN_REL, f"forward {i} {name}: {mx:.2e} / {mean:.2e}"
    print(f"{dtype}: worst max-rel x0 difference fused vs unfused {worst:.3e}")


def test_fusing_survives_dtype_and_device_conversion():
    with torch.device("meta"):
        m = DualStreamDiT(load_fusion_config("video_tiny", "audio_tiny"))
    m.fuse_projections()  # structural on meta
    m = m.to(torch.float64).to_empty(device="cpu")  # both replace every tensor: _apply fuses again
    m.reset_rope()
    init_random_(m)
    sa = m.audio_model.blocks[0].self_attn
    assert m.projections_fused and sa.qkv_weight.dtype == torch.float64 and sa.qkv_weight.device.type == "cpu"
    assert sa.k.weight.data_ptr() == sa.qkv_weight[sa.q.out_features].data_ptr()
    x = torch.randn(1, 5, m.cfg.audio.dim, dtype=torch.float64)
    q, k, v = sa.project("qkv", x)
    assert_close(k, sa.k(x), rtol=1e-12, atol=1e-12, what="fused k after .to/.to_empty")


@pytest.mark.skipif(not (SHARED / "data/keys/dit_causal_5B.txt").exists(), reason="shared/ key lists not present")
def test_full_size_meta_model_fused_keeps_released_names_and_count():
    with torch.device("meta"):
        m = DualStreamDiT(load_fusion_config("video_causal_5B", "audio_causal_5B"))
    m.fuse_projections()
    got = {"model." + k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == key_list("dit_causal_5B.txt") and len(got) == 2073
    assert sum(p.numel() for p in m.parameters()) == FULL_PARAMS
    fused = [k for k, _ in m.named_buffers() if k.endswith(("qkv_weight", "kv_weight", "kv_fusion_weight"))]
    assert len(fused) == 2 * 30 * 3  # per stream and layer: self qkv, text kv, fusion kv


def test_fused_step_with_a_forced_kernel_compiles_fullgraph_and_matches_eager(tiny_profile):
    """No host sync and no graph break with both fast paths on (the cudagraph backend needs the former)."""
    torch._dynamo.reset()
    dit = tiny_dit()
    dit.fuse_projections()
    dit.set_attention_kernel("math")
    nv, na, ctx = tiny_inputs(tiny_profile, 2)
    bs = BlockStream(dit, tiny_profile, blocks=2)
    bs.start(ctx)
    plan = list(bs.policy.plans())[1]
    bs.cursor.set(plan)
    args = (nv[:, 2:4], na[:, :plan.audio_len], torch.full((1, 2), 937.5), torch.full((1, plan.audio_len), 937.5))
    state0 = {k: v.clone() for k, v in bs.state.tensors().items()}
    ev, ea = bs.eager_step(*args, plan)
    for k, v in bs.state.tensors().items():
        v.copy_(state0[k])
    cv, ca = torch.compile(lambda *a: bs.eager_step(*a, plan), fullgraph=True)(*args)
    assert_close(cv, ev, rtol=1e-4, atol=1e-5, what="compiled fused video flow")
    assert_close(ca, ea, rtol=1e-4, atol=1e-5, what="compiled fused audio flow")


def test_fused_dit_exports_with_torch_export(tiny_profile):
    from hallolive_rt.export.contracts import contracts_for
    from hallolive_rt.export.dit import dit_export_mode, dit_module_for

    contract = contracts_for(tiny_profile)["dit"]
    v = contract.variants[1]
    dit = tiny_dit()
    ins = v.sample_inputs(seed=2)
    for i in range(4, 12):
        ins[i] = torch.randn_like(ins[i])
    ins[12].fill_(12)
    ins[13].fill_(2)
    with dit_export_mode(dit, float64_time=True), torch.no_grad():
        ref = dit_module_for(dit, contract, v, functional=False)(*[t.clone() for t in ins])
        dit.fuse_projections()
        mod = dit_module_for(dit, contract, v, functional=False)
        ep = torch.export.export(mod, tuple(ins), strict=False)
        got = ep.module()(*[t.clone() for t in ins])
    for g, r in zip(got, ref):
        assert_close(g, r, rtol=1e-5, atol=1e-5, what="exported fused DiT step")


# ---- attention kernels ------------------------------------------------------------------------------------

def _qkv(dtype, device="cpu", d=64):
    g = torch.Generator(device=device).manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)  # noqa: E731
    return r(2, 19, 2, d), r(2, 33, 2, d), r(2, 33, 2, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["auto", "math", "flash"])  # flash: PyTorch's CPU flash kernel
def test_cpu_kernels_equal_the_reference(kernel, dtype):
    q, k, v = _qkv(dtype)
    check_attention_kernel(kernel, "cpu", dtype, [64])
    with attention_kernel(kernel):
        got = attention(q, k, v)
    tol = ATTN_TOL[dtype]
    assert_close(got, attention_reference(q, k, v), rtol=tol, atol=tol, what=f"{kernel} {dtype}")


def test_the_forward_runs_the_chosen_kernel_and_refuses_unavailable_ones(tiny_profile):
    dit, bs, plan, nv, na = first_step(tiny_profile)
    args = _step_args(nv, na, plan)
    flows = {}
    for kernel in ("math", "flash"):
        dit.set_attention_kernel(kernel)
        with _OpLog() as log:
            flows[kernel] = bs.eager_step(*args, plan)
        flash = any("flash_attention" in op for op in log.ops)
        assert flash == (kernel == "flash"), sorted(op for op in log.ops if "attention" in op)
    for a, b in zip(*flows.values()):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what="math vs flash forward")
    for kernel in ("cudnn", "efficient"):  # CUDA-only kernels: refused up front, naming choice and device
        with pytest.raises(ValueError, match=f"attention kernel '{kernel}' cannot run on cpu"):
            dit.set_attention_kernel(kernel)
        assert dit.attn_kernel == "flash"  # a refused choice changes nothing
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'.*auto, math, flash, cudnn, efficient"):
        dit.set_attention_kernel("fast")


def test_session_applies_and_reports_the_choices_and_refuses_them_for_artifacts(tiny_profile):
    from hallolive_rt.cli import AttnKernel
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.levers import check_dit_options
    from hallolive_rt.runtime.session import StreamSession

    assert tuple(k.value for k in AttnKernel) == ATTENTION_KERNELS
    comps = load_components(tiny_profile, None, with_text=False)
    sess = StreamSession(comps, tiny_profile, dit=DiTOptions(fuse_projections=True, attn_kernel="math"), blocks=1)
    d = sess.describe()
    assert d["fuse_projections"] is True and d["attn_kernel"] == "math" and comps.dit.projections_fused
    d = StreamSession(comps, tiny_profile, blocks=1).describe()  # defaults: the released forward again
    assert d["fuse_projections"] is False and d["attn_kernel"] == "auto" and not comps.dit.projections_fused
    for backend in ("aoti", "tensorrt"):
        with pytest.raises(ValueError, match=f"which the {backend} backend does not run"):
            check_dit_options(DiTOptions(fuse_projections=True), backend, "cpu", torch.float32, comps.cfg)
        check_dit_options(DiTOptions(), backend, "cpu", torch.float32, comps.cfg)  # defaults always apply


# ---- GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_cuda_kernels_equal_math_in_bf16(kernel):
    for d in (128, 64):  # the full-size head dim and the tiny one
        try:
            check_attention_kernel(kernel, "cuda", torch.bfloat16, [d])
        except ValueError as e:
            pytest.skip(str(e))  # e.g. cuDNN attention on a GPU/driver without it: named, not hidden
        q, k, v = _qkv(torch.bfloat16, "cuda", d)
        with attention_kernel("math"):
            want = attention(q, k, v)
        with attention_kernel(kernel):
            got = attention(q, k, v)
        tol = ATTN_TOL[torch.bfloat16]
        assert_close(got, want, rtol=tol, atol=tol, what=f"{kernel} vs math, head dim {d}")
        assert_close(got, attention_reference(q, k, v), rtol=tol, atol=tol, what=f"{kernel} vs reference")


@pytest.mark.cuda
def test_cuda_fused_flash_stream_matches_released_path(tiny_profile):
    prof = tiny_profile.with_overrides(dtype="bfloat16")
    cfg = load_fusion_config(prof.video_config, prof.audio_config)
    dit = build_dit(cfg, device="cuda", dtype=torch.bfloat16)
    nv, na, ctx = (t.cuda() for t in tiny_inputs(prof, BLOCKS, dtype=torch.bfloat16))

    def run():
        res = generate(dit, prof, ctx, nv, na, TorchNoise(7, device="cuda"), record=True)
        return [(r.x0_v, r.x0_a) for r in res.records if r.x0_v is not None]

    ref = run()
    dit.fuse_projections()
    dit.set_attention_kernel("flash")
    for (gv, ga), (rv, ra) in zip(run(), ref):
        for a, b in ((gv, rv), (ga, ra)):
            mx, mean = _rel(a, b)
            assert mx < 5e-2 and mean < 1e-2, f"{mx:.2e} / {mean:.2e}"  # the stream test's bf16 bound
