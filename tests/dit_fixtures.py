"""Tiny DiT builders shared by the DiT, stream and export tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hallolive_rt.config import load_fusion_config
from hallolive_rt.model.dit_weights import build_dit
from hallolive_rt.profile import Profile, load_profile

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # CI: a clone with shared/ beside it
KEYS_DIR = Path(os.environ.get("HALLOLIVE_KEYS_DIR", SHARED / "data" / "keys"))


def tiny_dit(dtype=torch.float32, seed: int = 0, profile: Profile | None = None):
    p = profile or load_profile("tiny")
    cfg = load_fusion_config(p.video_config, p.audio_config)
    return build_dit(cfg, device="cpu", dtype=dtype, seed=seed)


def tiny_inputs(profile: Profile, blocks: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    fb, na = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    v = profile.video
    nv = torch.randn(1, blocks * fb, v.latent_channels, v.latent_height, v.latent_width, generator=g)
    na_ = torch.randn(1, blocks * na, profile.audio.latent_channels, generator=g)
    ctx = torch.randn(1, profile.text.text_len, profile.text.text_dim, generator=g)
    return nv.to(dtype), na_.to(dtype), ctx.to(dtype)


def first_step(profile: Profile, dit=None):
    """A one-block ``BlockStream`` of ``dit`` (default: ``tiny_dit()``) started on a random prompt and
    positioned at its first step: ``(dit, stream, plan, noise_video, noise_audio)``."""
    from hallolive_rt.stream import BlockStream

    dit = dit if dit is not None else tiny_dit()
    nv, na, ctx = tiny_inputs(profile, 1)
    bs = BlockStream(dit, profile, blocks=1)
    bs.start(ctx)
    plan = next(bs.policy.plans())
    bs.cursor.set(plan)
    return dit, bs, plan, nv, na


def key_list(name: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from a shared key list (``name<TAB>shape<TAB>dtype`` lines)."""
    out = {}
    for line in (KEYS_DIR / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        k, shape, _ = line.split("\t")
        out[k] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return out
