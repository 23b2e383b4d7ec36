"""The DiT's structure against the released checkpoint, its configs, and RoPE against the release's
complex128 formula."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hallolive_rt.config import ConfigError, StreamConfig, load_fusion_config
from hallolive_rt.model.dit import DualStreamDiT, sinusoidal_embedding
from hallolive_rt.model.rope import RopeTables, apply_rope
from tests.conftest import assert_close
from tests.dit_fixtures import SHARED, first_step, key_list
from tests.reference_loop import audio_freqs, rope_1d, rope_3d, video_freqs

FULL_PARAMS = 11_660_753_108


@pytest.mark.skipif(not (SHARED / "data/keys/dit_causal_5B.txt").exists(), reason="shared/ key lists not present")
def test_full_size_meta_model_matches_checkpoint_names_shapes_and_count():
    cfg = load_fusion_config("video_causal_5B", "audio_causal_5B")
    with torch.device("meta"):
        m = DualStreamDiT(cfg)
    got = {"model." + k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = key_list("dit_causal_5B.txt")
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    assert sum(p.numel() for p in m.parameters()) == FULL_PARAMS
    assert len(got) == 2073


def test_config_reads_official_schema_and_rejects_bad_fields(tmp_path):
    cfg = load_fusion_config("video_causal_5B", "audio_causal_5B")
    assert (cfg.video.dim, cfg.video.num_layers, cfg.video.head_dim) == (3072, 30, 128)
    assert cfg.video.rope_pairs == (22, 21, 21) and cfg.audio.temporal_rope_scaling_factor == 0.2
    assert cfg.audio.patch_embed_hidden == 8192 and cfg.video.text_dim == 4096
    bad = tmp_path / "v.json"
    bad.write_text('{"patch_size": [1,2,2], "model_type": "ti2v", "dim": 128, "bogus": 1}')
    with pytest.raises(ConfigError, match="bogus"):
        StreamConfig.from_json(bad)
    bad.write_text('{"patch_size": [1,2,2], "model_type": "ti2v", "dim": 128}')
    with pytest.raises(ConfigError, match="missing.*ffn_dim"):
        StreamConfig.from_json(bad)
    # any size works from a JSON pair, e.g. dim 128, 2 heads, 2 layers, text_dim 64
    tiny = load_fusion_config("video_tiny", "audio_tiny")
    assert (tiny.video.dim, tiny.video.num_heads, tiny.num_layers, tiny.video.text_dim) == (128, 2, 2, 64)


@pytest.mark.parametrize("head_dim", [128, 64])
def test_video_rope_matches_complex128_reference(head_dim):
    cfg = StreamConfig(model_type="ti2v", patch_size=(1, 2, 2), dim=2 * head_dim, ffn_dim=8, freq_dim=256,
                       num_heads=2, num_layers=1, in_dim=48, out_dim=48)
    tables = RopeTables(cfg)
    f, h, w = 3, 4, 5
    for start in (0, 7, 1000):
        x = torch.randn(2, f * h * w, 2, head_dim)
        cos, sin = tables.video(start + torch.arange(f), h, w)
        ours = apply_rope(x, cos, sin)
        ref = rope_3d(x, start, f, h, w, video_freqs(head_dim))
        assert_close(ours, ref, rtol=1e-5, atol=1e-5, what=f"video rope start={start}")


def test_audio_rope_rotates_first_pairs_at_fifth_frequency_and_leaves_the_rest():
    cfg = load_fusion_config("video_causal_5B", "audio_causal_5B").audio
    tables = RopeTables(cfg)
    x = torch.randn(1, 40, 2, 128)
    for start in (0, 33, 900):
        cos, sin = tables.audio(start + torch.arange(40))
        ours = apply_rope(x, cos, sin)
        assert_close(ours, rope_1d(x, start, audio_freqs(128, 0.2)), rtol=1e-5, atol=1e-5, what="audio rope")
        assert torch.equal(ours[..., 44:], x[..., 44:])  # pairs 22..63 pass through
    # 5 audio tokens advance the angle exactly as much as 1 latent frame
    vt = RopeTables(load_fusion_config("video_causal_5B", "audio_causal_5B").video)
    assert_close(tables.cos_t[5], vt.cos_t[1], rtol=1e-6, atol=1e-6, what="audio/video clock")


class _DtypeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.dtype))
        return out


def test_forward_has_no_complex_and_float64_only_in_the_release_time_embedding(tiny_profile):
    dit, bs, plan, nv, na = first_step(tiny_profile)
    xa = na[:, :tiny_profile.audio_window]
    t_v, t_a = torch.full((1, 2), 937.5), torch.full((1, xa.shape[1]), 937.5)
    for fp64 in (True, False):
        dit.video_model.time_fp64 = dit.audio_model.time_fp64 = fp64
        with _DtypeLog() as log:
            bs.eager_step(nv[:, :2], xa, t_v, t_a, plan)
        assert not [f for f, d in log.seen if d.is_complex]
        n64 = len([1 for f, d in log.seen if d == torch.float64])
        if fp64:  # the sinusoidal time embedding is float64 in the release (once per stream); nothing else is
            with _DtypeLog() as one:
                sinusoidal_embedding(t_v.flatten(), 256)
            assert n64 == 2 * len([1 for f, d in one.seen if d == torch.float64]) > 0
        else:
            assert n64 == 0
