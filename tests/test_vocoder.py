"""BigVGAN vocoder (layout, weight-norm folding, anti-aliasing) and the audio decode chain: decode_full
and the block-streaming decoder (shapes, exact cases, measured deviation from full decode)."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hallolive_rt.model.audio_stream import (
    StreamingAudioDecoder,
    decode_full,
    measure_stream_deviation,
)
from hallolive_rt.model.vae_audio import MMAudioVAEConfig, build_audio_decoder
from hallolive_rt.model.vocoder import (
    BigVGANConfig,
    BigVGANVocoder,
    build_vocoder,
    fold_weight_norm,
    load_vocoder,
)
from hallolive_rt.model.vocoder_activations import AntiAliasedActivation, kaiser_sinc_filter
from hallolive_rt.weights import CheckpointError
from tests.conftest import assert_close
from tests.dit_fixtures import KEYS_DIR

KEYS = KEYS_DIR
VOCODER_PARAMS = 112_199_473  # after weight-norm removal (docs/FACTS.md section 5)


def _folded_key_list(path: Path) -> dict[str, tuple[int, ...]]:
    """Key list with each (g, v) pair replaced by '<conv>.weight' shaped like v."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if name.endswith(("weight_g", "original0")):
            continue
        name = name.replace(".parametrizations.weight.original1", ".weight").replace(".weight_v", ".weight")
        out[name] = dims
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return build_audio_decoder(MMAudioVAEConfig.tiny()), build_vocoder(BigVGANConfig.tiny())


# ---- vocoder ---------------------------------------------------------------------------------------------

def test_config_matches_release_and_profile(tiny_profile):
    full, tiny = BigVGANConfig(), BigVGANConfig.tiny()
    assert full.upsample_rates == tiny.upsample_rates == (4, 4, 2, 2, 2, 2)
    assert full.upsample_kernel_sizes == (8, 8, 4, 4, 4, 4) and full.upsample_initial_channel == 1536
    assert full.resblock_kernel_sizes == (3, 7, 11) and full.resblock_dilation_sizes == ((1, 3, 5),) * 3
    assert (full.activation, full.snake_logscale, full.num_mels) == ("snakebeta", True, 80)
    for vae_cfg, voc_cfg in ((MMAudioVAEConfig(), full), (MMAudioVAEConfig.tiny(), tiny)):
        assert vae_cfg.mel_frames_per_token * voc_cfg.hop_length == tiny_profile.audio.samples_per_token == 512
    with pytest.raises(ValueError, match="AMPBlock1"):
        BigVGANConfig(resblock="2")


@pytest.mark.parametrize("layout", ["bigvgan_16k.txt", "bigvgan_16k_parametrizations.txt"])
def test_meta_build_matches_checkpoint_key_list(layout):
    if not (KEYS / layout).is_file():
        pytest.skip("key list not available")
    with torch.device("meta"):
        m = BigVGANVocoder(BigVGANConfig())
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == _folded_key_list(KEYS / layout)
    assert sum(p.numel() for p in m.parameters()) == VOCODER_PARAMS
    assert sum(1 for k in got if k.endswith("filter")) == 218


def test_default_filters_are_lowpass_taps():
    taps = kaiser_sinc_filter(0.25, 0.3, 12)
    assert taps.shape == (1, 1, 12)
    assert_close(taps.sum(), torch.tensor(1.0), rtol=0, atol=1e-6, what="DC gain")
    assert torch.equal(taps, taps.flip(-1))
    # a half-band filter: strong attenuation at Nyquist
    nyq = (taps.flatten() * torch.tensor([(-1.0) ** i for i in range(12)])).sum().abs()
    assert nyq < 0.02


def test_antialiased_identity_keeps_a_smooth_signal():
    """With an identity activation, upsample -> downsample must return a band-limited input unchanged and
    unshifted (catches off-by-one crops/pads)."""
    act = AntiAliasedActivation(nn.Identity())
    t = torch.arange(256, dtype=torch.float32)
    x = torch.stack([torch.sin(2 * math.pi * t / 32), torch.cos(2 * math.pi * t / 48 + 1)]).unsqueeze(0)
    y = act(x)
    assert y.shape == x.shape
    assert_close(y[..., 16:-16], x[..., 16:-16], rtol=0, atol=2e-2, what="interior")


def _weight_normed_copy(m: BigVGANVocoder, legacy: bool) -> nn.Module:
    """Reference whose convs compute g * v / ||v|| at every forward, with g perturbed away from ||v||."""
    ref = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in ref.modules():
            if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
                if legacy:
                    nn.utils.weight_norm(mod)
                    g = mod.weight_g
                else:
                    nn.utils.parametrizations.weight_norm(mod)
                    g = mod.parametrizations.weight.original0
                with torch.no_grad():
                    g.mul_(torch.rand_like(g) + 0.5)
    return ref


@pytest.mark.parametrize("legacy", [True, False], ids=["weight_g_v", "parametrizations"])
def test_load_folds_weight_norm(tmp_path, legacy):
    cfg = BigVGANConfig.tiny()
    ref = _weight_normed_copy(build_vocoder(cfg), legacy)
    sd = ref.state_dict()
    assert any(k.endswith("weight_g" if legacy else "original0") for k in sd)
    torch.save({"generator": sd}, tmp_path / "best_netG.pt")
    m = load_vocoder(tmp_path / "best_netG.pt", cfg)
    mel = torch.randn(2, 80, 9) - 2
    with torch.no_grad():
        want, got = ref(mel), m(mel)
    assert got.shape == (2, 1, 9 * 256)
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="folded vs weight-normed vocoder")
    # a flat state dict (no 'generator' nesting) is accepted too, and the dtype applies
    torch.save(sd, tmp_path / "flat.pt")
    assert load_vocoder(tmp_path / "flat.pt", cfg, dtype=torch.bfloat16).conv_pre.weight.dtype == torch.bfloat16


def test_fold_weight_norm_pairs():
    v = torch.randn(4, 3, 5)
    g = torch.rand(4, 1, 1)
    out = fold_weight_norm({"c.weight_g": g, "c.weight_v": v, "c.bias": torch.zeros(4)})
    assert set(out) == {"c.weight", "c.bias"}
    assert_close(out["c.weight"].flatten(1).norm(dim=1), g.flatten(), rtol=1e-5, atol=1e-6, what="|w| = g")
    with pytest.raises(CheckpointError, match="no direction"):
        fold_weight_norm({"c.weight_g": g})
    with pytest.raises(CheckpointError, match="no magnitude"):
        fold_weight_norm({"c.parametrizations.weight.original1": v})


def test_bad_files_fail_clearly(tmp_path):
    cfg = BigVGANConfig.tiny()
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="junk.pt: not a PyTorch checkpoint"):
        load_vocoder(tmp_path / "junk.pt", cfg)
    torch.save({"generator": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="'generator' is a list"):
        load_vocoder(tmp_path / "list.pt", cfg)
    torch.save({"decoder.conv_in.weight": torch.zeros(3)}, tmp_path / "vae.pth")  # the wrong model's file
    with pytest.raises(CheckpointError, match=r"(?s)vae.pth: does not match the BigVGAN.*missing keys"):
        load_vocoder(tmp_path / "vae.pth", cfg)
    torch.save({"generator": {"conv_pre.weight_g": torch.ones(1)}}, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match="half.pt: weight-norm magnitude"):
        load_vocoder(tmp_path / "half.pt", cfg)
    with pytest.raises(CheckpointError, match="file not found"):
        load_vocoder(tmp_path / "absent.pt", cfg)


def test_vocoder_compiles_without_graph_breaks(models):
    _, voc = models
    mel = torch.randn(1, 80, 4) - 2
    compiled = torch.compile(voc, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(mel), voc(mel), rtol=1e-6, atol=1e-6, what="compiled vocoder")


# ---- decode_full and streaming ---------------------------------------------------------------------------

def test_decode_full_shape_and_chain(models):
    vae, voc = models
    lat = torch.randn(2, 7, 20)  # [B, L, C] channel-last, as the DiT produces it
    wav = decode_full(vae, voc, lat)
    assert wav.shape == (2, 7 * 512) and wav.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(wav, voc(vae(lat.transpose(1, 2)))[:, 0])
    assert 0.01 < wav.std() < 0.9  # the random build is speech-level, not DC or saturated


def test_stream_sample_counts_and_state(models, tiny_profile):
    vae, voc = models
    dec = StreamingAudioDecoder.from_profile(tiny_profile, vae, voc)
    n, blocks = tiny_profile.stream.audio_tokens_per_block, tiny_profile.stream.blocks
    lat = torch.randn(1, n * blocks, 20)
    state = dec.new_state(1)
    outs = [dec.step(state, lat[:, i * n:(i + 1) * n]) for i in range(blocks)]
    assert all(o.shape == (1, n * 512) and o.dtype == torch.float32 for o in outs)
    assert sum(o.shape[1] for o in outs) == decode_full(vae, voc, lat).shape[1]
    assert state.committed == n * blocks
    assert torch.equal(state.history, lat[:, -tiny_profile.audio.stream_left_context:])
    with pytest.raises(ValueError, match="commits 10 per block"):
        dec.step(state, lat[:, :3])


@pytest.mark.parametrize("start,lengths", [("trim", [10, 20, 20]), ("reflect", [20, 20, 20]), ("zeros", [20, 20, 20])])
def test_stream_window_shapes(models, start, lengths):
    """trim: the first call has no left context (2 shapes when left <= N); padded modes: one shape."""
    vae, voc = models
    dec = StreamingAudioDecoder(vae, voc, block_tokens=10, left_context=10, start=start)
    seen = []
    inner = dec.decode_window
    dec.decode_window = lambda w: (seen.append(w.shape[1]), inner(w))[1]
    state = dec.new_state(1)
    lat = torch.randn(1, 30, 20)
    for i in range(3):
        dec.step(state, lat[:, 10 * i:10 * i + 10])
    assert seen == lengths


def test_stream_is_exact_when_the_window_spans_the_clip(models):
    """The decoders are non-causal, so streaming is exact only when a window holds the whole clip: the last
    block with all history as left context, the first block with the rest of the clip as lookahead."""
    vae, voc = models
    lat = torch.randn(1, 30, 20)
    full = decode_full(vae, voc, lat)
    dec = StreamingAudioDecoder(vae, voc, block_tokens=10, left_context=20)
    state = dec.new_state(1)
    last = [dec.step(state, lat[:, i:i + 10]) for i in (0, 10, 20)][-1]
    assert_close(last, full[:, 20 * 512:], rtol=1e-5, atol=1e-5, what="last block, full left context")
    dec = StreamingAudioDecoder(vae, voc, block_tokens=10, left_context=0, future_tokens=20)
    first = dec.step(dec.new_state(1), lat[:, :10], lat[:, 10:])
    assert_close(first, full[:, :10 * 512], rtol=1e-5, atol=1e-5, what="first block, full lookahead")


# Measured on this tiny random model (seed 0, tiny profile: 3 blocks of 10 tokens, left context 10):
#   F=0: SNR 13.1 dB, worst block 10.8 dB, max abs 0.73 (full-decode RMS 0.24)
#   F=5 (ideal lookahead): SNR 24.7 dB, worst block 21.4 dB, max abs 0.088
# The bounds leave ~1.5 dB of margin for other BLAS builds; they document, not promise, real-model quality.
@pytest.mark.parametrize("future,min_snr,max_abs", [(0, 11.0, 0.8), (5, 23.0, 0.12)])
def test_stream_deviation_from_full_decode_is_bounded(models, tiny_profile, future, min_snr, max_abs):
    vae, voc = models
    torch.manual_seed(0)
    lat = torch.randn(1, tiny_profile.total_audio_tokens, 20)
    r = measure_stream_deviation(vae, voc, lat, block_tokens=tiny_profile.stream.audio_tokens_per_block,
                                 left_context=tiny_profile.audio.stream_left_context, future_tokens=future)
    print(f"F={future}: {r}")
    assert r["snr_db"] >= min_snr and r["max_abs"] <= max_abs, r


@pytest.mark.slow
def test_stream_deviation_table_full_timing():
    """The README table: released block size (30 tokens, 5 blocks), tiny widths (same receptive field)."""
    torch.manual_seed(0)
    vae, voc = build_audio_decoder(MMAudioVAEConfig.tiny()), build_vocoder(BigVGANConfig.tiny())
    lat = torch.randn(1, 150, 20)
    rows = {}
    for left in (0, 30, 60):  # measured too: left=10 gives 17.4 / 27.3 dB
        for future in (0, 5):
            r = measure_stream_deviation(vae, voc, lat, block_tokens=30, left_context=left, future_tokens=future)
            rows[left, future] = r
            print(f"left={left:3d} F={future}: SNR {r['snr_db']:.1f} dB, worst block {r['worst_block_snr_db']:.1f} dB, "
                  f"max abs {r['max_abs']:.3f}")
    assert rows[30, 0]["snr_db"] > 16.0 and rows[30, 5]["snr_db"] > 27.0
    assert rows[30, 5]["snr_db"] > rows[30, 0]["snr_db"] + 8  # lookahead is what matters most
