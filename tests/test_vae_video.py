"""Wan2.2 video VAE decoder: static-state streaming vs the release-style reference, layout, loading, capture."""

from __future__ import annotations

import ast

import pytest
import torch

from hallolive_rt.model.vae_video import (
    VideoDecodeState,
    WanVAEConfig,
    WanVideoDecoder,
    build_video_decoder,
    load_video_decoder,
)
from hallolive_rt.weights import CheckpointError
from tests.conftest import assert_close
from tests.dit_fixtures import KEYS_DIR

KEYS = KEYS_DIR / "wan22_vae.txt"
DECODER_PARAMS, CONV2_PARAMS = 555_049_228, 2_352  # counted from the release's WanVAE_ (docs/FACTS.md section 5)
H, W = 4, 6  # tiny profile latent grid


def _tiny() -> WanVideoDecoder:
    """Tiny decoder with non-trivial norm gains and biases (the defaults are ones and zeros)."""
    m = build_video_decoder(WanVAEConfig.tiny(), device="cpu").eval().requires_grad_(False)
    for name, p in m.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.uniform_(p, 0.5, 1.5)
        elif name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.05)
    return m


def test_config_factors():
    for cfg in (WanVAEConfig(), WanVAEConfig.tiny()):
        assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 16)
        assert cfg.pixel_frames(6, first=True) == 21 and cfg.pixel_frames(6, first=False) == 24


def test_full_size_layout_matches_release_on_meta():
    m = build_video_decoder(WanVAEConfig(), device="meta")
    sd = m.state_dict()
    n_dec = sum(v.numel() for k, v in sd.items() if k.startswith("decoder."))
    n_conv2 = sum(v.numel() for k, v in sd.items() if k.startswith("conv2."))
    assert (n_dec, n_conv2) == (DECODER_PARAMS, CONV2_PARAMS)
    assert "latent_mean" not in sd and "latent_inv_std" not in sd  # not in the file: non-persistent
    assert len(m.decoder.cached_convs) == 32
    # The bf16 history at 512x992 (latent 32x62): what the runtime must budget for.
    state = m.new_state(1, 32, 62, torch.bfloat16, "meta")
    assert state.nbytes == 1_812_582_400
    if not KEYS.is_file():
        pytest.skip(f"{KEYS} not present (set HALLOLIVE_KEYS_DIR); counts checked above")
    expected = {}
    for line in KEYS.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _dtype = line.split("\t")
        if name.startswith(("decoder.", "conv2.")):
            expected[name] = tuple(ast.literal_eval(shape))
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert sorted(set(got) ^ set(expected)) == []
    assert [k for k in got if got[k] != expected[k]] == []


def test_nearest_equals_the_releases_nearest_exact_at_factor_two():
    """Resample upsamples with 'nearest' (an ONNX Resize) where the release wrote 'nearest-exact'."""
    import torch.nn.functional as F

    x = torch.randn(2, 3, 2, 5, 7)  # odd sizes: any rounding difference would show at the edges
    got = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    assert torch.equal(got, F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact"))


def test_stats_are_real_after_build():
    m = build_video_decoder(WanVAEConfig.tiny(), device="cpu")
    assert m.latent_mean.shape == (48,) and m.latent_inv_std.shape == (48,)
    assert abs(m.latent_mean[0].item() + 0.2289) < 1e-6 and abs(1 / m.latent_inv_std[-1].item() - 0.7744) < 1e-6
    # release mode: a cast rounds the float32 constants once to the weights' dtype (the release's .to())
    m = m.to(torch.float16).to(torch.bfloat16)
    assert m.conv2.weight.dtype == torch.bfloat16 and m.latent_inv_std.dtype == torch.bfloat16
    assert m.latent_inv_std[0].item() == (1 / torch.tensor(0.4765)).to(torch.bfloat16).item()
    m.set_stats("fp32")  # the option: exact float32 constants whatever the weights
    assert m.latent_inv_std.dtype == torch.float32 and m.latent_inv_std[0].item() == (1 / torch.tensor(0.4765)).item()
    m = m.to(torch.bfloat16)
    assert m.latent_mean.dtype == torch.float32 and m.latent_mean[0].item() == torch.tensor(-0.2289).item()


def test_stats_follow_the_weights_device_by_default():
    """init_stats() with no device rebuilds the constants where the weights are (the H100 session's
    fp8 report called it after building on cuda and got the statistics on the CPU)."""
    m = build_video_decoder(WanVAEConfig.tiny(), device="cpu").to("meta")
    assert m.latent_mean.device.type == "meta"
    m.init_stats()
    assert m.latent_mean.device.type == "meta" and m.latent_inv_std.device.type == "meta"
    m.init_stats("cpu")  # an explicit device still wins
    assert m.latent_inv_std.device.type == "cpu"


@pytest.mark.parametrize("block", [1, 2])
def test_blockwise_static_state_equals_full_reference(block):
    m = _tiny()
    z = torch.randn(2, 48, 5, H, W)
    with torch.no_grad():
        ref = m.decode_full(z)  # [2, 3, 17, 64, 96]
        state = m.new_state(2, H, W)
        outs = [m.decode_block(z[:, :, i:i + block], state, first_block=i == 0) for i in range(0, 5, block)]
    out = torch.cat(outs, dim=2)
    assert ref.shape == out.shape == (2, 3, 17, 64, 96)
    assert 0.1 < ref.std().item() and (ref.abs() < 1).float().mean().item() > 0.9  # not saturated
    assert_close(out, ref, rtol=0, atol=1e-6, what=f"blocks of {block} vs release-style full decode")


def test_frame_counts_and_state_shapes_are_static():
    m = _tiny()
    state = m.new_state(1, H, W)
    assert isinstance(state, VideoDecodeState) and len(state.history) == 32
    ptrs = [b.data_ptr() for b in state.history]
    shapes = state.shapes()
    z = torch.randn(1, 48, 4, H, W)
    with torch.no_grad():
        counts = [m.decode_frame(z[:, :, i:i + 1], state, first=i == 0).shape[2] for i in range(4)]
        assert state.shapes() == shapes and [b.data_ptr() for b in state.history] == ptrs
        assert m.decode_block(z[:, :, :2], state, first_block=False).shape == (1, 3, 8, 64, 96)
    assert counts == [1, 4, 4, 4]
    assert all(s[0] == 1 and s[2] == 2 for s in shapes)
    with pytest.raises(ValueError, match="does not fit"):
        m.decode_frame(torch.randn(1, 48, 1, H + 1, W), state, first=False)


def test_functional_step_equals_in_place_step():
    m = _tiny()
    z = torch.randn(1, 48, 3, H, W)
    state = m.new_state(1, H, W)
    history = tuple(torch.randn_like(b) for b in state.history)  # stale: the first step must ignore it
    with torch.no_grad():
        for i in range(3):
            want = m.decode_frame(z[:, :, i:i + 1], state, first=i == 0)
            got, history = m.decode_frame_functional(z[:, :, i:i + 1], history, first=i == 0)
            assert torch.equal(got, want)
            assert [tuple(h.shape) for h in history] == state.shapes()
            assert all(torch.equal(h, b) for h, b in zip(history, state.history))


def test_first_frame_ignores_stale_state():
    """The first-frame variant writes a full fresh history: a used state needs no reset."""
    m = _tiny()
    z = torch.randn(1, 48, 3, H, W)
    with torch.no_grad():
        used = m.new_state(1, H, W)
        m.decode_block(torch.randn(1, 48, 3, H, W), used, first_block=True)
        a = m.decode_block(z, used, first_block=True)
        b = m.decode_block(z, m.new_state(1, H, W), first_block=True)
    assert torch.equal(a, b)


def test_load_roundtrip_drops_encoder_and_checks_shapes(tmp_path):
    src = _tiny()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["encoder.conv1.weight"] = torch.randn(16, 12, 3, 3, 3)  # present in the release file, dropped
    sd["conv1.weight"] = torch.randn(96, 96, 1, 1, 1)
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(sd, path)
    m = load_video_decoder(path, WanVAEConfig.tiny(), dtype=torch.float32, device="cpu")
    z = torch.randn(1, 48, 2, H, W)
    assert torch.equal(m.decode_full(z), src.decode_full(z))
    assert load_video_decoder(path, WanVAEConfig.tiny(), dtype=torch.bfloat16).conv2.weight.dtype == torch.bfloat16

    sd["decoder.head.2.weight"] = torch.randn(12, 8, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.weight"):
        load_video_decoder(path, WanVAEConfig.tiny())
    torch.save({"encoder.conv1.weight": torch.randn(2)}, path)
    with pytest.raises(CheckpointError, match="no 'decoder"):
        load_video_decoder(path, WanVAEConfig.tiny())


def _compiled_matches_eager(backend: str) -> None:
    m = _tiny()
    z = torch.randn(1, 48, 3, H, W)
    s_eager, s_comp = m.new_state(1, H, W), m.new_state(1, H, W)
    step = torch.compile(m.decode_frame, fullgraph=True, backend=backend)  # a graph break would raise
    with torch.no_grad():
        m.decode_frame(z[:, :, :1], s_eager, first=True)
        m.decode_frame(z[:, :, :1], s_comp, first=True)
        for i in (1, 2):
            want = m.decode_frame(z[:, :, i:i + 1], s_eager, first=False)
            got = step(z[:, :, i:i + 1], s_comp, False)
            assert_close(got, want, rtol=0, atol=2e-5, what=f"{backend} frame {i}")
            for a, b in zip(s_comp.history, s_eager.history):
                assert_close(a, b, rtol=0, atol=2e-5, what=f"{backend} state after frame {i}")


def test_steady_step_compiles_fullgraph():
    torch._dynamo.reset()
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_steady_step_compiles_fullgraph_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")


@pytest.mark.cuda
def test_steady_step_cuda_graph_capture_without_sync():
    """Capture decode_frame(first=False) once, replay it for later frames, compare with eager."""
    m = _tiny().cuda()
    z = torch.randn(1, 48, 4, H, W, device="cuda")
    s_eager, s_graph = m.new_state(1, H, W), m.new_state(1, H, W)
    static_z = z[:, :, 1:2].clone()
    with torch.no_grad():
        m.decode_frame(z[:, :, :1], s_eager, first=True)
        m.decode_frame(z[:, :, :1], s_graph, first=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a scratch state: capture must not see its updates
            scratch = m.new_state(1, H, W)
            for _ in range(2):
                m.decode_frame(static_z, scratch, first=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        got, want = [], []
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                static_out = m.decode_frame(static_z, s_graph, first=False)
            for i in (1, 2, 3):
                static_z.copy_(z[:, :, i:i + 1])
                graph.replay()
                got.append(static_out.clone())
                want.append(m.decode_frame(z[:, :, i:i + 1], s_eager, first=False))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, rtol=0, atol=1e-4, what=f"graph replay frame {i + 1}")
