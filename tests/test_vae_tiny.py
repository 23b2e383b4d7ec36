"""Tiny preview decoder (TAEHV for Wan2.2): released layout, loading and refusals, agreement with a plain
reference, block-wise streaming == whole clip, bf16, the two variants, and a graph with no break."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hallolive_rt.model.vae_tiny import (
    TinyDecodeState,
    TinyVideoDecoder,
    build_tiny_decoder,
    decoder_parameter_count,
    load_tiny_decoder,
)
from hallolive_rt.weights import CheckpointError
from tests.conftest import assert_close
from tests.tiny_reference import FULL_WIDTHS, random_state_dict, reference_decode, released_shapes

WIDTHS = (16, 8, 8, 8)
ENC = 8
H, W = 2, 3  # latent grid: 32 x 48 pixels
FULL_PARAMS = 9_923_532  # decoder parameters at full width (the encoder is never built)
BF16_MAX, BF16_MEAN = 0.12, 0.012  # measured at most 0.041 / 0.0038 (either variant); bound with ~3x margin


def _stats(m: TinyVideoDecoder) -> tuple[list[float], list[float]]:
    """The model's latent mean and std (their values are checked in test_dtype_cast_keeps_statistics_in_float32)."""
    return m.latent_mean.tolist(), m.latent_std.tolist()


@pytest.fixture(scope="module")
def released_sd():
    return random_state_dict(released_shapes(WIDTHS, ENC), seed=1)


@pytest.fixture(scope="module")
def pth(released_sd, tmp_path_factory):
    p = tmp_path_factory.mktemp("tiny") / "taew2_2.pth"
    torch.save(released_sd, p)
    return p


def _z(t: int, batch: int = 1, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 48, t, H, W, generator=torch.Generator().manual_seed(seed))


def _load(path, variant="taew2_2", **kw) -> TinyVideoDecoder:
    return load_tiny_decoder(path, variant=variant, widths=WIDTHS, **kw)


# ---- layout, size, contract -------------------------------------------------------------------------------

def test_full_size_layout_on_meta():
    shapes = released_shapes(FULL_WIDTHS)
    assert len(shapes) == 128 and sum(k.startswith("encoder.") for k in shapes) == 64
    m = build_tiny_decoder("taew2_2", device="meta")
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == {k: v for k, v in shapes.items() if k.startswith("decoder.")}
    assert decoder_parameter_count() == FULL_PARAMS == sum(p.numel() for p in m.parameters())
    assert (m.z_dim, m.spatial_factor, m.temporal_factor) == (48, 16, 4)
    # The bf16 memory at 512x992 (latent 32x62): 9 buffers, 5376 channel-planes of the latent grid in all.
    st = m.new_state(1, 32, 62, torch.bfloat16, "meta")
    assert len(st.memory) == 9 and st.nbytes == 5376 * 32 * 62 * 2


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_released_file_loads_and_decodes(released_sd, tmp_path, fmt):
    p = tmp_path / f"taew2_2.{fmt}"
    torch.save(released_sd, p) if fmt == "pth" else save_file(released_sd, str(p))
    m = _load(p)
    assert (m.dtype, m.device.type, m.cfg.widths) == (torch.float32, "cpu", WIDTHS)
    assert not any(p.requires_grad for p in m.parameters())
    x = m.decode_full(_z(3))
    assert x.shape == (1, 3, 9, 16 * H, 16 * W)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # not constant, not all clamped


def test_state_object_and_checks(pth):
    m = _load(pth)
    st = m.new_state(2, H, W)
    assert isinstance(st, TinyDecodeState) and st.shapes()[0] == (2, 16, H, W) and st.shapes()[-1] == (2, 8, 4 * H, 4 * W)
    with torch.no_grad():
        m.decode_frame(_z(1, 2), st, first=True)
    assert all(b.abs().sum() > 0 for b in st.memory)
    st.reset()
    assert all(b.abs().sum() == 0 for b in st.memory)
    cl = st.with_layout(torch.channels_last_3d)
    assert all(b.is_contiguous(memory_format=torch.channels_last) for b in cl.memory)
    with pytest.raises(ValueError, match="does not fit a state"):
        m.decode_frame(_z(1, 1), st, first=False)


def test_dtype_cast_keeps_statistics_in_float32(pth):
    m = _load(pth, "lighttaew2_2").to(torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.latent_mean.dtype == m.latent_std.dtype == torch.float32
    assert abs(m.latent_mean[0].item() + 0.2289) < 1e-6 and abs(m.latent_std[-1].item() - 0.7744) < 1e-6


# ---- numbers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["taew2_2", "lighttaew2_2"])
def test_matches_plain_reference(released_sd, pth, variant):
    m = _load(pth, variant)
    mean, std = _stats(m)
    z = _z(4, batch=2)
    light = variant == "lighttaew2_2"
    for clamp in (True, False):
        ref = reference_decode(released_sd, z, denormalise=light, mean=mean, std=std, clamp=clamp)
        for parallel in (False, True):
            got = m.decode_full(z, clamp=clamp, parallel=parallel)
            assert got.shape == ref.shape == (2, 3, 13, 16 * H, 16 * W)
            assert_close(got, ref, rtol=0, atol=1e-5, what=f"{variant} clamp={clamp} parallel={parallel} vs reference")


def test_blockwise_equals_whole_clip(pth):
    m = _load(pth)
    z = _z(6, batch=2)
    full = m.decode_full(z)
    st = m.new_state(2, H, W)  # reused across splits without a reset: the first block zero-starts it
    for split in [(1, 5), (2, 4), (3, 3), (1, 2, 3), (3, 1, 1, 1), (1, 1, 1, 1, 1, 1)]:
        out, t = [], 0
        with torch.no_grad():
            for j, n in enumerate(split):
                out.append(m.decode_block(z[:, :, t:t + n], st, first_block=j == 0))
                t += n
        got = torch.cat(out, dim=2)
        assert out[0].shape[2] == 4 * split[0] - 3
        assert torch.equal(got, full), f"blocks {split}: max abs err {(got - full).abs().max():.3e}"


def test_functional_frame_equals_in_place(pth):
    m = _load(pth)
    z = _z(3)
    st = m.new_state(1, H, W)
    mem = tuple(torch.zeros_like(b) for b in st.memory)
    with torch.no_grad():
        for i in range(3):
            a = m.decode_frame(z[:, :, i:i + 1], st, first=i == 0)
            b, mem = m.decode_frame_functional(z[:, :, i:i + 1], mem, first=i == 0)
            assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(st.memory, mem))


@pytest.mark.parametrize("variant", ["taew2_2", "lighttaew2_2"])
def test_bf16_within_bound_of_fp32(pth, variant):
    f32, b16 = _load(pth, variant), _load(pth, variant, dtype=torch.bfloat16)
    z = _z(4)
    ref = f32.decode_full(z)
    got = b16.decode_full(z.to(torch.bfloat16)).float()
    err = (got - ref).abs()
    msg = f"{variant} bf16 vs fp32: max {err.max():.3e} (bound {BF16_MAX}), mean {err.mean():.3e} (bound {BF16_MEAN})"
    assert err.max() <= BF16_MAX and err.mean() <= BF16_MEAN, msg


def test_wide_tgrow_weight_keeps_last_rows(tmp_path):
    wide = random_state_dict(released_shapes(WIDTHS, ENC, wide_grow=(7,)), seed=3)
    exact = dict(wide)
    exact["decoder.7.conv.weight"] = wide["decoder.7.conv.weight"][-WIDTHS[0]:].clone()
    assert wide["decoder.7.conv.weight"].shape[0] == 2 * WIDTHS[0]
    torch.save(wide, tmp_path / "wide.pth")
    torch.save(exact, tmp_path / "exact.pth")
    z = _z(3)
    a, b = _load(tmp_path / "wide.pth").decode_full(z), _load(tmp_path / "exact.pth").decode_full(z)
    assert torch.equal(a, b)
    assert_close(a, reference_decode(wide, z), rtol=0, atol=1e-5, what="wide TGrow vs reference")


# ---- refusals and variants ------------------------------------------------------------------------------

def test_wan_vae_file_refused(tmp_path):
    p = tmp_path / "Wan2.2_VAE.pth"
    torch.save({"decoder.conv1.weight": torch.zeros(1), "decoder.middle.0.residual.0.gamma": torch.zeros(1),
                "conv2.weight": torch.zeros(1), "encoder.conv1.weight": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError) as e:
        _load(p)
    msg = str(e.value)
    assert str(p) in msg and "'decoder.conv1.weight'" in msg and "decoder.<index>" in msg and "full" in msg


def test_file_without_decoder_refused(tmp_path, released_sd):
    p = tmp_path / "encoder_only.pth"
    torch.save({k: v for k, v in released_sd.items() if k.startswith("encoder.")}, p)
    with pytest.raises(CheckpointError, match=r"no 'decoder\.\*' keys.*'encoder\.0\.weight'"):
        _load(p)


def test_truncated_and_misshapen_files_refused(tmp_path, released_sd):
    cut = {k: v for k, v in released_sd.items() if not k.startswith(("decoder.15.", "decoder.22."))}
    torch.save(cut, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "cut.pth")
    assert str(tmp_path / "cut.pth") in str(e.value) and "missing keys 8" in str(e.value)
    assert "'decoder.15.conv.0.weight'" in str(e.value)
    bad = dict(released_sd, **{"decoder.8.weight": torch.zeros(8, 8, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches 1: 'decoder\.8\.weight \(file \(8, 8, 3, 3\), "
                                              r"model \(8, 16, 3, 3\)\)'"):
        _load(tmp_path / "bad.pth")
    # a full-width file for a narrow configuration says so too
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_tiny_decoder(tmp_path / "bad.pth", variant="taew2_2")


@pytest.mark.parametrize("variant", ["taew2_1", "full", "", None])
def test_variant_must_be_named(pth, variant):
    with pytest.raises(ValueError, match="taew2_2, lighttaew2_2"):
        load_tiny_decoder(pth, variant=variant, widths=WIDTHS)
    with pytest.raises(ValueError, match="taew2_2, lighttaew2_2"):
        build_tiny_decoder(variant, device="meta")


def test_light_variant_denormalises(pth):
    taew, light = _load(pth, "taew2_2"), _load(pth, "lighttaew2_2")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in _stats(light))
    z = _z(3)
    assert torch.equal(light.decode_full(z), taew.decode_full(z * std + mean))
    assert not torch.allclose(light.decode_full(z), taew.decode_full(z))


# ---- compiled -------------------------------------------------------------------------------------------

def test_compiled_frame_has_no_graph_break(pth):
    torch._dynamo.reset()
    m = _load(pth)
    fn = torch.compile(m.decode_frame, fullgraph=True, backend="aot_eager")
    z = _z(3)
    st_e, st_c = m.new_state(1, H, W), m.new_state(1, H, W)
    with torch.no_grad():
        for i in range(3):
            e = m.decode_frame(z[:, :, i:i + 1], st_e, first=i == 0)
            c = fn(z[:, :, i:i + 1], st_c, first=i == 0)
            assert_close(c, e, rtol=0, atol=1e-6, what=f"compiled frame {i}")
    for a, b in zip(st_c.memory, st_e.memory):
        assert_close(a, b, rtol=0, atol=1e-6, what="compiled state")
