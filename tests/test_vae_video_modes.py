"""Wan2.2 decoder options: the release's bf16 de-normalisation vs float32 statistics, and unclamped decode.

The release (Hallo-Live's ``Wan2_2_VAE.to(dtype=bfloat16)``) casts the model and its ``scale = [mean, 1/std]``
to bf16 and computes ``z / scale[1] + scale[0]`` in bf16; ``stats="release"`` must equal that arithmetic
written out by hand here, ``stats="fp32"`` the same formula in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hallolive_rt.model import vae_video
from hallolive_rt.model.vae_video import STATS_MODES, WanVAEConfig, build_video_decoder, load_video_decoder
from tests.conftest import assert_close

H, W = 4, 6
STATS = json.loads(Path(vae_video.__file__).with_name("wan22_latent_stats.json").read_text())  # the 48 constants


def _decoder(stats: str, dtype: torch.dtype):
    torch.manual_seed(1)
    m = build_video_decoder(WanVAEConfig.tiny(), device="cpu", stats=stats)
    for name, p in m.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.uniform_(p, 0.5, 1.5)
        elif name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.05)
    return m.to(dtype).eval().requires_grad_(False)


def _hand_denorm(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z / (1/std) + mean with both constants rounded once from float32 to ``dtype``, computed in ``dtype``."""
    mean = torch.tensor(STATS["mean"], dtype=torch.float32).to(dtype).view(1, -1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(STATS["std"], dtype=torch.float32)).to(dtype).view(1, -1, 1, 1, 1)
    return z.to(dtype) / inv_std + mean


def test_release_mode_is_the_releases_bf16_arithmetic_and_fp32_mode_differs():
    z = torch.randn(1, 48, 3, H, W).to(torch.bfloat16)  # the DiT hands over bf16 latents
    rel, f32 = _decoder("release", torch.bfloat16), _decoder("fp32", torch.bfloat16)
    assert rel.stats == "release" == build_video_decoder(WanVAEConfig.tiny(), device="meta").stats  # the default
    assert rel.latent_mean.dtype == rel.latent_inv_std.dtype == torch.bfloat16
    assert f32.latent_mean.dtype == f32.latent_inv_std.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(rel._unnormalize(z), rel.conv2(_hand_denorm(z, torch.bfloat16)))
        assert torch.equal(f32._unnormalize(z), f32.conv2(_hand_denorm(z, torch.float32).to(torch.bfloat16)))
        # same weights, same latents: only the rounding of the de-normalisation differs, and it shows
        assert not torch.equal(_hand_denorm(z, torch.bfloat16), _hand_denorm(z, torch.float32).to(torch.bfloat16))
        a, b = rel.decode_full(z), f32.decode_full(z)
    assert not torch.equal(a, b)
    assert_close(a.float(), b.float(), rtol=0, atol=0.1, what="bf16 release vs fp32-stats decode")


def test_modes_agree_exactly_in_float32_and_switch_in_place():
    z = torch.randn(1, 48, 2, H, W)
    rel, f32 = _decoder("release", torch.float32), _decoder("fp32", torch.float32)
    with torch.no_grad():
        assert torch.equal(rel.decode_full(z), f32.decode_full(z))
    m = _decoder("release", torch.bfloat16)
    assert m.set_stats("fp32").latent_inv_std.dtype == torch.float32
    assert m.set_stats("release").latent_inv_std.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="choose one of release, fp32"):
        m.set_stats("bf16")
    assert STATS_MODES == ("release", "fp32")


def test_loader_takes_the_mode(tmp_path):
    src = _decoder("release", torch.float32)
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(src.state_dict(), path)
    for stats, want in (("release", torch.bfloat16), ("fp32", torch.float32)):
        m = load_video_decoder(path, WanVAEConfig.tiny(), dtype=torch.bfloat16, stats=stats)
        assert m.stats == stats and m.latent_mean.dtype == m.latent_inv_std.dtype == want


def test_unclamped_decode_returns_the_values_the_clamp_cuts():
    m = _decoder("release", torch.float32)
    with torch.no_grad():
        m.decoder.head[2].bias.add_(0.9)  # push part of the picture past 1 so the clamp has work to do
        z = torch.randn(1, 48, 3, H, W)
        raw = m.decode_full(z, clamp=False)
        clamped = m.decode_full(z)
        state = m.new_state(1, H, W)
        streamed = m.decode_block(z, state, first_block=True, clamp=False)
        frame, _ = m.decode_frame_functional(z[:, :, :1], m.new_state(1, H, W).history, True, clamp=False)
    assert raw.max() > 1.0 and clamped.max() <= 1.0 and clamped.min() >= -1.0
    assert torch.equal(clamped, raw.clamp(-1, 1))
    assert_close(streamed, raw, rtol=0, atol=1e-6, what="unclamped block decode vs unclamped full decode")
    assert torch.equal(frame, raw[:, :, :1])
