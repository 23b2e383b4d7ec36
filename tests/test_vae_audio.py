"""MMAudio 16k VAE decoder: checkpoint layout, the magnitude-preserving weight fold, loading errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from hallolive_rt.model.vae_audio import (
    AudioVAEDecoder,
    MMAudioVAEConfig,
    MPConv1d,
    build_audio_decoder,
    fold_mp_weight,
    load_audio_decoder,
)
from hallolive_rt.weights import CheckpointError
from tests.conftest import assert_close
from tests.dit_fixtures import KEYS_DIR

KEYS = KEYS_DIR / "mmaudio_vae_16k.txt"
DECODER_PARAMS = 99_127_297  # docs/FACTS.md section 5


def _key_list(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split("\t")
        out[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_config_matches_release_and_profile(tiny_profile):
    full, tiny = MMAudioVAEConfig(), MMAudioVAEConfig.tiny()
    assert (full.data_dim, full.embed_dim, full.hidden_dim) == (80, 20, 384)
    assert full.ch_mult == tiny.ch_mult == (1, 2, 4) and tiny.num_res_blocks == full.num_res_blocks
    assert full.mel_frames_per_token == tiny.mel_frames_per_token == 2
    assert tiny.embed_dim == tiny_profile.audio.latent_channels
    with pytest.raises(ValueError, match="per-level attention"):
        MMAudioVAEConfig(attn_layers=(1,))


@pytest.mark.skipif(not KEYS.is_file(), reason="key list not available")
def test_meta_build_matches_checkpoint_key_list():
    with torch.device("meta"):
        m = AudioVAEDecoder(MMAudioVAEConfig())
    want = {k: v for k, v in _key_list(KEYS).items() if not k.startswith("encoder.")}
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in m.parameters()) == DECODER_PARAMS


def test_fold_formula_on_known_values():
    # rows of constant c: rms = c, so each weight becomes c / (c + 1e-4) / sqrt(fan_in)
    w = torch.stack([torch.full((3, 2), 2.0), torch.full((3, 2), 0.5)])  # [2, 3, 2], fan_in 6
    f = fold_mp_weight(w)
    assert_close(f[0], torch.full((3, 2), 2.0 / 2.0001 / math.sqrt(6)), rtol=1e-6, atol=0, what="row 0")
    assert_close(f[1], torch.full((3, 2), 0.5 / 0.5001 / math.sqrt(6)), rtol=1e-6, atol=0, what="row 1")
    assert fold_mp_weight(w.bfloat16()).dtype == torch.bfloat16


class _OnTheFlyMP(nn.Module):
    """Reference: EDM2's forced weight normalisation done at every forward, written independently:
    w / (||w_o|| + eps * sqrt(fan_in)) == w / (eps + ||w_o|| / sqrt(fan_in)) / sqrt(fan_in)."""

    def __init__(self, gain: nn.Parameter | None = None):
        super().__init__()
        self.gain = gain

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fan = w[0].numel()
        n = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.ndim - 1)))
        out = w / (n + 1e-4 * math.sqrt(fan))
        return out if self.gain is None else out * (self.gain + 1)


def _raw_state(cfg: MMAudioVAEConfig) -> dict[str, torch.Tensor]:
    """A release-layout state dict: small raw MP weights (so the 1e-4 epsilon matters), a non-zero gain,
    and encoder keys the loader must drop."""
    with torch.device("meta"):
        m = AudioVAEDecoder(cfg)
    sd = {k: torch.randn(v.shape) * (0.02 if k.endswith(".weight") else 1.0)
          for k, v in m.state_dict().items()}
    sd["decoder.learnable_gain"] = torch.tensor(0.25)
    sd["data_mean"] = torch.randn(1, 80, 1) - 2
    sd["data_std"] = torch.rand(1, 80, 1) + 0.5
    sd["encoder.learnable_gain"] = torch.tensor(0.0)
    sd["encoder.conv_in.weight"] = torch.randn(cfg.hidden_dim, cfg.data_dim, 3)
    return sd


def test_load_folds_like_on_the_fly_normalisation(tmp_path):
    cfg = MMAudioVAEConfig.tiny()
    sd = _raw_state(cfg)
    path = tmp_path / "v1-16.pth"
    torch.save(sd, path)
    folded = load_audio_decoder(path, cfg)

    ref = AudioVAEDecoder(cfg)
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith("encoder.")})
    gain = ref.decoder.learnable_gain
    ref.decoder.learnable_gain = nn.Parameter(torch.zeros(()))  # the gain moves into conv_out's weight
    for name, mod in ref.named_modules():
        if isinstance(mod, MPConv1d):
            on_the_fly = _OnTheFlyMP(gain if name == "decoder.conv_out" else None)
            parametrize.register_parametrization(mod, "weight", on_the_fly)
    z = torch.randn(2, 20, 13)
    with torch.no_grad():
        want, got = ref(z), folded(z)
    assert got.shape == (2, 80, 26)
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="folded vs on-the-fly MP normalisation")


def test_load_casts_and_keeps_statistics(tmp_path):
    cfg = MMAudioVAEConfig.tiny()
    sd = _raw_state(cfg)
    torch.save(sd, tmp_path / "v.pth")
    m = load_audio_decoder(tmp_path / "v.pth", cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters()) and not any(p.requires_grad for p in m.parameters())
    assert_close(m.data_mean.float(), sd["data_mean"], rtol=1e-2, atol=1e-2, what="data_mean")
    # an already-folded file loads unchanged when told so
    torch.save(build_audio_decoder(cfg).state_dict(), tmp_path / "folded.pth")
    again = load_audio_decoder(tmp_path / "folded.pth", cfg, raw_mp_weights=False)
    ref = torch.load(tmp_path / "folded.pth")
    assert torch.equal(again.decoder.conv_in.weight, ref["decoder.conv_in.weight"])


def test_bad_files_fail_clearly(tmp_path):
    cfg = MMAudioVAEConfig.tiny()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        load_audio_decoder(junk, cfg)
    truncated = tmp_path / "trunc.pth"
    torch.save(_raw_state(cfg), tmp_path / "ok.pth")
    truncated.write_bytes((tmp_path / "ok.pth").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="trunc.pth"):
        load_audio_decoder(truncated, cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatches"):  # tiny file, full-size config
        load_audio_decoder(tmp_path / "ok.pth", MMAudioVAEConfig())
    torch.save({"conv_pre.weight": torch.zeros(3)}, tmp_path / "vocoder.pt")  # the wrong model's file
    with pytest.raises(CheckpointError, match=r"(?s)missing keys .*unexpected keys 1: 'conv_pre.weight'"):
        load_audio_decoder(tmp_path / "vocoder.pt", cfg)
    torch.save({"encoder.conv_in.weight": torch.zeros(3)}, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="no tensors outside 'encoder"):
        load_audio_decoder(tmp_path / "enc.pt", cfg)


def test_decoder_is_not_causal():
    """Why streaming needs context: changing the last token moves the first mel frames (attention)."""
    m = build_audio_decoder(MMAudioVAEConfig.tiny())
    z = torch.randn(1, 20, 16)
    z2 = z.clone()
    z2[..., -1] += 1.0
    with torch.no_grad():
        d = (m(z) - m(z2)).abs()
    assert d[..., :2].max() > 1e-4


def test_compiles_without_graph_breaks():
    m = build_audio_decoder(MMAudioVAEConfig.tiny())
    z = torch.randn(1, 20, 12)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(z), m(z), rtol=1e-6, atol=1e-6, what="compiled decoder")
