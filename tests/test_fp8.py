"""``--precision fp8`` on the PyTorch path (``hallolive_rt.model.fp8``): the float8 Linear against its
references, the DiT quantized in place, the session plumbing, and the deviation table's bounds.

References and tolerances:
  * ``emulate`` against a float64 quantize-dequantize of the same scales: 1e-6 relative (float32 sums);
  * ``scaled_mm`` (torch's CPU kernel here, Hopper's on a GPU) against ``emulate``: fp32 output 1e-5
    relative (accumulation order), bf16 output 1.6e-2 (one bf16 rounding of the output);
  * fp8 against the unquantized Linear: < 6e-2 relative RMS (e4m3 keeps 3 mantissa bits: ~2-3% RMS per
    operand, measured ~3.5e-2 here);
  * the stream (``bench/fp8_deviation.py`` on the tiny preset, 3 blocks, free-running): bounds below,
    ~3x the committed measurement (bench/results/cpu-fp8-deviation-tiny.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hallolive_rt.options import DecoderOptions, DiTOptions
from hallolive_rt.model.fp8 import (ACT_SCALES, FP8, Float8Linear, fake_quant, fp8_eligible, quantize_rows,
                                    scaled_mm_works)
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate
from tests.conftest import assert_close
from tests.dit_fixtures import tiny_dit, tiny_inputs

REPO = Path(__file__).resolve().parents[1]
# deviation-table bounds (tiny preset, CPU): x0 / latents relative RMS, frames PSNR
BOUNDS = {("bf16", "fp32"): (1e-2, 45.0), ("fp8/scaled_mm", "bf16"): (4e-2, 40.0),
          ("fp8/emulate", "bf16"): (4e-2, 40.0), ("fp8/scaled_mm", "fp32"): (4e-2, 40.0),
          ("fp8/emulate", "fp32"): (4e-2, 40.0), ("fp8/scaled_mm", "fp8/emulate"): (4e-2, 40.0)}


def _linear(k=64, n=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        lin.weight[3].zero_()  # a zero row: scale 1, no NaN
    x = torch.randn(2, 7, k, generator=g).to(dtype)
    x[0, 2].zero_()  # a zero token: scale 1, no NaN
    return lin, x


def _rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


# ---- the module --------------------------------------------------------------------------------------------

def test_weights_are_the_exports_float8_rows():
    from hallolive_rt.export import fp8 as export_fp8

    assert export_fp8.quantize_rows is quantize_rows and export_fp8.fake_quant is fake_quant  # one definition
    lin, _ = _linear(dtype=torch.bfloat16)
    f = Float8Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    q, s = quantize_rows(lin.weight, torch.bfloat16)
    assert f.weight.dtype == FP8 and torch.equal(f.weight.view(torch.uint8), q.view(torch.uint8))
    assert f.weight_scale.dtype == torch.float32 and torch.equal(f.weight_scale[0], s.float())
    assert f.weight_scale[0, 3] == 1.0  # zero row


@pytest.mark.parametrize("act", ACT_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulation_is_quantize_dequantize_with_the_same_scales(dtype, act):
    lin, x = _linear(dtype=dtype)
    f = Float8Linear.from_linear(lin, compute_dtype=dtype, act_scale=act, impl="emulate")
    x2 = x.reshape(-1, x.shape[-1]).double()
    amax = x2.abs().amax(1, keepdim=True) if act == "token" else x2.abs().amax().expand(x2.shape[0], 1)
    sx = torch.where(amax > 0, amax.float() / 448, torch.ones_like(amax.float()))
    xdq = (x2.float() / sx).clamp(-448, 448).to(FP8).double() * sx
    wdq = f.weight.double() * f.weight_scale[0, :, None].double()
    want = (xdq @ wdq.T + lin.bias.double()).reshape(*x.shape[:-1], -1)
    got = f(x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol * want.abs().max().item(),
                 what=f"emulate {dtype} {act}")


@pytest.mark.parametrize("act", ACT_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_equals_the_emulation(dtype, act):
    why = scaled_mm_works("cpu", dtype)
    if why is not None:
        pytest.skip(f"torch._scaled_mm cannot run on this CPU build: {why}")
    lin, x = _linear(dtype=dtype)
    emu = Float8Linear.from_linear(lin, compute_dtype=dtype, act_scale=act, impl="emulate")
    smm = Float8Linear.from_linear(lin, compute_dtype=dtype, act_scale=act, impl="scaled_mm")
    got, want = smm(x), emu(x)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), what=f"scaled_mm vs emulate {dtype}")
    ref = lin(x)  # and both stay close to the unquantized layer
    assert _rel_rms(got, ref) < 6e-2


def test_float8_linear_refuses_bad_options_and_keeps_ineligible_shapes():
    lin, _ = _linear()
    with pytest.raises(ValueError, match="act_scale 'row'"):
        Float8Linear.from_linear(lin, compute_dtype=torch.float32, act_scale="row")
    with pytest.raises(ValueError, match="scaled_mm or emulate"):
        Float8Linear.from_linear(lin, compute_dtype=torch.float32, impl="auto")
    assert fp8_eligible(nn.Linear(128, 256)) and not fp8_eligible(nn.Linear(128, 20))


# ---- the DiT -----------------------------------------------------------------------------------------------

def test_quantize_fp8_replaces_every_eligible_linear_and_shrinks_the_weights():
    from hallolive_rt.runtime.components import _stored_bytes

    dit = tiny_dit()
    linears = [n for n, m in dit.named_modules() if type(m) is nn.Linear]
    eligible = [n for n, m in dit.named_modules() if type(m) is nn.Linear and fp8_eligible(m)]
    before = _stored_bytes(dit)
    info = dit.quantize_fp8(impl="emulate")
    assert info["linears_fp8"] == len(eligible) and info["linears_kept"] == sorted(set(linears) - set(eligible))
    assert info["linears_kept"] == ["audio_model.head.head"]  # 20 outputs: not a multiple of 16
    assert not [n for n, m in dit.named_modules() if type(m) is nn.Linear and fp8_eligible(m)]
    mods = dict(tiny_dit().named_modules())
    # float32 -> float8: 3 bytes saved per weight, 4 bytes spent per row on its float32 scale
    assert before - _stored_bytes(dit) == sum(3 * mods[n].weight.numel() - 4 * mods[n].out_features for n in eligible)
    assert dit.quantize_fp8(impl="emulate") is info  # same options: a no-op
    with pytest.raises(ValueError, match="already float8"):
        dit.quantize_fp8(act_scale="tensor", impl="emulate")


def test_fused_groups_quantize_as_one_gemm_and_give_the_same_stream(tiny_profile):
    nv, na, ctx = tiny_inputs(tiny_profile, 2)
    outs = {}
    for fused in (False, True):
        dit = tiny_dit()
        if fused:
            dit.fuse_projections()
        dit.quantize_fp8(impl="emulate")
        outs[fused] = generate(dit, tiny_profile.with_overrides(blocks=2), ctx, nv, na, TorchNoise(7))
        if fused:
            sa = dit.video_model.blocks[0].self_attn
            assert isinstance(sa.qkv_fp8, Float8Linear) and sa.k.weight.data_ptr() == sa.qkv_fp8.weight[
                sa.q.out_features].data_ptr()  # members are row views of the fused float8 weight
            assert "qkv_weight" not in dict(sa.named_buffers())  # the bf16 copy is gone
            with pytest.raises(ValueError, match="layout cannot change"):
                dit.unfuse_projections()
            dit.fuse_projections()  # the same layout: a no-op
    # per-row scales make row concatenation exact: fused and unfused float8 are the same numbers
    assert torch.equal(outs[True].video, outs[False].video) and torch.equal(outs[True].audio, outs[False].audio)


def test_session_precision_fp8_is_applied_recorded_and_refused_where_it_cannot_apply(tiny_profile):
    from hallolive_rt.cli import ActScale, Precision
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.options import PRECISIONS
    from hallolive_rt.runtime.levers import check_dit_options
    from hallolive_rt.runtime.session import StreamSession

    assert tuple(p.value for p in Precision) == PRECISIONS and tuple(a.value for a in ActScale) == ACT_SCALES
    comps = load_components(tiny_profile, None, with_text=False)
    sess = StreamSession(comps, tiny_profile, dit=DiTOptions(precision="fp8"), decoders=DecoderOptions(overlap=False), blocks=1)
    d = sess.describe()
    assert d["precision"] == "fp8" and d["fp8"]["act_scale"] == "token" and d["fp8"]["linears_fp8"] > 0
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    blk = list(sess.run(ctx, seed=0))[0]
    assert blk.frames.shape[0] > 0 and torch.isfinite(torch.as_tensor(blk.audio)).all()
    with pytest.raises(ValueError, match="hold a float8 DiT"):  # no silent way back to the dtype
        StreamSession(comps, tiny_profile, decoders=DecoderOptions(overlap=False), blocks=1)
    for backend in ("aoti", "tensorrt"):
        with pytest.raises(ValueError, match=f"which the {backend} backend does not run"):
            check_dit_options(DiTOptions(precision="fp8"), backend, "cpu", torch.bfloat16, comps.cfg)
    with pytest.raises(ValueError, match="not float16"):
        check_dit_options(DiTOptions(precision="fp8"), "eager", "cpu", torch.float16, comps.cfg)
    assert DiTOptions(precision="bf16").dtype_with(None) == "bfloat16"
    assert DiTOptions(precision="fp8").dtype_with("float32") == "float32"
    with pytest.raises(ValueError, match="means --dtype float16"):
        DiTOptions(precision="fp16").dtype_with("bfloat16")


def test_cli_precision_flags_reach_the_stream(tmp_path):
    from typer.testing import CliRunner

    from hallolive_rt.cli import app

    r = CliRunner().invoke(app, ["stream", "--out", str(tmp_path / "a.mp4"), "--blocks", "1", "--kv-impl", "torch",
                                 "--precision", "fp8", "--lean-context", "--metrics", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "m.json").read_text())["session"]
    assert s["precision"] == "fp8" and s["lean_context"] is True and s["fp8"]["impl"] in ("scaled_mm", "emulate")
    r = CliRunner().invoke(app, ["stream", "--out", str(tmp_path / "b.mp4"), "--precision", "fp8",
                                 "--dtype", "float16"])
    assert r.exit_code == 2 and "bfloat16" in r.output


# ---- the deviation table -----------------------------------------------------------------------------------

def _check_bounds(table: dict, where: str) -> None:
    rows = {(r["run"], r["vs"]): r for r in table["rows"]}
    assert set(rows) == set(BOUNDS), f"{where}: rows {sorted(rows)}"
    for key, (rel, psnr) in BOUNDS.items():
        r = rows[key]
        vals = {"x0 video": r["x0_rel_rms"]["video"]["max"], "x0 audio": r["x0_rel_rms"]["audio"]["max"],
                "latents video": r["latents_rel_rms"]["video"], "latents audio": r["latents_rel_rms"]["audio"]}
        for name, v in vals.items():
            assert 0 < v < rel, f"{where} {key}: {name} rel-RMS {v:.3e} >= {rel:.0e}"
        assert r["frames_psnr_db"] > psnr, f"{where} {key}: frames PSNR {r['frames_psnr_db']:.1f} dB"
        assert len(r["x0_rel_rms_per_forward"]) == table["blocks"] * 4


def test_fp8_deviation_table_is_bounded_and_the_committed_one_too():
    from hallolive_rt.runtime.fp8_report import fp8_deviation

    fresh = fp8_deviation("tiny", device="cpu", log=lambda m: None)
    assert fresh["emulated"] is True and "EMULATED" in fresh["runs"]["fp8/emulate"]["label"]
    _check_bounds(fresh, "recomputed")
    committed = json.loads((REPO / "bench/results/cpu-fp8-deviation-tiny.json").read_text())
    assert committed["emulated"] is True and committed["preset"] == "tiny" and committed["command"]
    _check_bounds(committed, "committed")


# ---- GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("act", ACT_SCALES)
def test_cuda_scaled_mm_equals_the_emulation_at_full_size_shapes(act):
    """Hopper's row-wise float8 GEMM against the CPU-tested emulation, on a video-block GEMM of the
    released model (2976 tokens x 3072 -> 3072 and the FFN's 3072 -> 14336)."""
    why = scaled_mm_works("cuda", torch.bfloat16)
    if why is not None:
        pytest.skip(f"no row-wise float8 GEMM on this GPU: {why}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for k, n in ((3072, 3072), (3072, 14336)):
        lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, 2976, k, device="cuda", generator=g).to(torch.bfloat16)
        emu = Float8Linear.from_linear(lin, compute_dtype=torch.bfloat16, act_scale=act, impl="emulate")
        smm = Float8Linear.from_linear(lin, compute_dtype=torch.bfloat16, act_scale=act, impl="scaled_mm")
        got, want = smm(x), emu(x)
        assert_close(got, want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item(), what=f"cuda {k}->{n} {act}")


@pytest.mark.cuda
def test_cuda_fp8_stream_is_within_the_tiny_tables_bounds():
    from hallolive_rt.runtime.fp8_report import fp8_deviation

    table = fp8_deviation("tiny", device="cuda", log=lambda m: None)
    if table["skipped"]:
        pytest.skip(f"no row-wise float8 GEMM on this GPU: {table['skipped']}")
    assert table["emulated"] is False
    _check_bounds(table, "cuda")
