"""One dual-stream layer of the DiT (video block ``i`` + audio block ``i``), the code all layers run:
``dual_layer`` is a plain function of the two ``FusionLayer`` modules, the hidden states, the layer's state
tensors and a hashable ``LayerStatic`` (whose ``part`` says how much a context-pass layer computes), so
``compile.LayerCompiler`` compiles it once and reuses it for every layer. The layer's equations and the lean
context parts: ``docs/ARCHITECTURE.md``, "The dual-stream layer".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .attention import attention, attention_kernel
from .layers import FusionLayer
from .rope import apply_rope

__all__ = ["LayerStatic", "LayerState", "dual_layer", "context_parts"]


@dataclass(frozen=True)
class LayerStatic:
    """The Python numbers baked into one layer's graph (hashable: a compiled layer guards on them)."""

    video_frames: int  # latent frames of the block (groups of the video modulation)
    audio_len: int  # audio tokens of the forward (groups of the audio modulation)
    video_kv_len: int  # cache rows attended
    sink: int  # cache layout, for the writes
    ring: int
    attn_kernel: str = "auto"
    part: str = "full"


class LayerState(NamedTuple):
    """One layer's slice of ``DiTState`` ([B, S, H, D] / [B, T, H, D] views) and the write row."""

    video_k: torch.Tensor
    video_v: torch.Tensor
    fusion_k: torch.Tensor
    fusion_v: torch.Tensor
    text_k_video: torch.Tensor
    text_v_video: torch.Tensor
    text_k_audio: torch.Tensor
    text_v_audio: torch.Tensor
    video_slot: torch.Tensor  # [1] int64


def context_parts(num_layers: int) -> list[str]:
    """``LayerStatic.part`` of each layer in a lean context pass (module docstring)."""
    parts = ["full"] * num_layers
    if num_layers >= 2:
        parts[-2] = "no_audio_tail"
    parts[-1] = "cache_only"
    return parts


def _modulate(norm, x, shift, scale, groups):
    return (norm(x).unflatten(1, (groups, -1)) * (1 + scale) + shift).flatten(1, 2)


def _gated(x, y, gate, groups):
    return x + (y.unflatten(1, (groups, -1)) * gate).flatten(1, 2)


def dual_layer(bv: FusionLayer, ba: FusionLayer, V: torch.Tensor, A: torch.Tensor, e0v: torch.Tensor,
               e0a: torch.Tensor, rope_v: tuple[torch.Tensor, torch.Tensor], rope_a: tuple[torch.Tensor, torch.Tensor],
               st: LayerState, kv, s: LayerStatic) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, Nv, Cv], A [B, La, Ca] -> the layer's (V, A); writes the block's video and fusion K/V.

    e0v [B, Fb, 6, Cv], e0a [B, La, 6, Ca] time modulation; rope_* (cos, sin) [N, D/2] float32 per token;
    ``kv`` the cache ops (``hallolive_rt.kvcache``). Returns the inputs' tensors where a part skips them.
    """
    with attention_kernel(s.attn_kernel):  # a no-op for auto; inside, so a compiled layer traces the choice
        return _layer(bv, ba, V, A, e0v, e0a, rope_v, rope_a, st, kv, s)


def _cross_ffn(blk: FusionLayer, x, m, groups: int, rope, text_k, text_v, fusion_k, fusion_v):
    """Text + fusion cross-attention (one shared query, RoPE'd for the fusion half), then the gated FFN."""
    q = blk.cross_attn.query(blk.norm3(x))
    o = attention(q, text_k, text_v) + attention(apply_rope(q, *rope), fusion_k, fusion_v)
    x = x + blk.cross_attn.o(o.flatten(2))
    return _gated(x, blk.ffn(_modulate(blk.norm2, x, m[3], m[4], groups)), m[5], groups)


def _layer(bv, ba, V, A, e0v, e0a, rope_v, rope_a, st: LayerState, kv, s: LayerStatic):
    nf, na, part, n = s.video_frames, s.audio_len, s.part, s.video_kv_len
    mv, ma = bv.mod(e0v), ba.mod(e0a)

    if part != "cache_only":
        # audio self-attention: the whole sequence, recomputed from position 0 (scratch K/V)
        q, k, v = ba.self_attn.qkv(_modulate(ba.norm1, A, ma[0], ma[1], na))
        y = attention(apply_rope(q, *rope_a), apply_rope(k, *rope_a), v)
        A = _gated(A, ba.self_attn.o(y.flatten(2)), ma[2], na)

    # video self-attention: write the block's RoPE'd K/V into the cache, attend to rows [0, kv_len)
    q, k, v = bv.self_attn.qkv(_modulate(bv.norm1, V, mv[0], mv[1], nf))
    kv.rope_write_block(st.video_k, k, *rope_v, st.video_slot, s.sink, s.ring)
    kv.write_block(st.video_v, v, st.video_slot, s.sink, s.ring)
    y = attention(apply_rope(q, *rope_v), st.video_k[:, :n], st.video_v[:, :n])
    V = _gated(V, bv.self_attn.o(y.flatten(2)), mv[2], nf)

    A0 = A
    # audio cross: text + video tokens through the fusion cache (RoPE'd with video positions)
    kf, vf = ba.cross_attn.fusion_kv(V)
    kv.rope_write_block(st.fusion_k, kf, *rope_v, st.video_slot, s.sink, s.ring)
    kv.write_block(st.fusion_v, vf, st.video_slot, s.sink, s.ring)
    if part == "cache_only":
        return V, A
    if part == "full":
        A = _cross_ffn(ba, A, ma, na, rope_a, st.text_k_audio, st.text_v_audio,
                       st.fusion_k[:, :n], st.fusion_v[:, :n])

    # video cross: text + the audio sequence after its self-attention (A0), scratch K/V
    kf, vf = bv.cross_attn.fusion_kv(A0)
    V = _cross_ffn(bv, V, mv, nf, rope_v, st.text_k_video, st.text_v_video, apply_rope(kf, *rope_a), vf)
    return V, A
