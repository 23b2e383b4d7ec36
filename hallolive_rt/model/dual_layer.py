"""One dual-stream layer of the DiT (video block ``i`` + audio block ``i``), the code all layers run:
``dual_layer`` is a plain function of the two ``FusionLayer`` modules, the hidden states, the layer's state
tensors and a hashable ``LayerStatic`` (whose ``part`` says how much a context-pass layer computes), so
``compile_dual_layer`` compiles it once and reuses it for every layer. The layer's equations and the lean
context parts: ``docs/ARCHITECTURE.md``, "The dual-stream layer".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .attention import attention, attention_kernel
from .layers import FusionLayer
from .rope import apply_rope

__all__ = ["LayerStatic", "LayerState", "LAYER_PARTS", "dual_layer", "context_parts", "compile_dual_layer"]

LAYER_PARTS = ("full", "no_audio_tail", "cache_only")


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


def _layer(bv, ba, V, A, e0v, e0a, rope_v, rope_a, st: LayerState, kv, s: LayerStatic):
    nf, na, part = s.video_frames, s.audio_len, s.part
    cos_v, sin_v = rope_v
    cos_a, sin_a = rope_a
    mv, ma = bv.mod(e0v), ba.mod(e0a)

    if part != "cache_only":
        # audio self-attention: the whole sequence, recomputed from position 0 (scratch K/V)
        q, k, v = ba.self_attn.qkv(_modulate(ba.norm1, A, ma[0], ma[1], na))
        y = attention(apply_rope(q, cos_a, sin_a), apply_rope(k, cos_a, sin_a), v)
        A = _gated(A, ba.self_attn.o(y.flatten(2)), ma[2], na)

    # video self-attention: write the block's RoPE'd K/V into the cache, attend to rows [0, kv_len)
    q, k, v = bv.self_attn.qkv(_modulate(bv.norm1, V, mv[0], mv[1], nf))
    kv.rope_write_block(st.video_k, k, cos_v, sin_v, st.video_slot, s.sink, s.ring)
    kv.write_block(st.video_v, v, st.video_slot, s.sink, s.ring)
    y = attention(apply_rope(q, cos_v, sin_v), st.video_k[:, :s.video_kv_len], st.video_v[:, :s.video_kv_len])
    V = _gated(V, bv.self_attn.o(y.flatten(2)), mv[2], nf)

    A0 = A
    # audio cross: text + video tokens through the fusion cache (RoPE'd with video positions)
    ca = ba.cross_attn
    kf, vf = ca.fusion_kv(V)
    kv.rope_write_block(st.fusion_k, kf, cos_v, sin_v, st.video_slot, s.sink, s.ring)
    kv.write_block(st.fusion_v, vf, st.video_slot, s.sink, s.ring)
    if part == "cache_only":
        return V, A
    if part == "full":
        qa = ca.query(ba.norm3(A))
        o = attention(qa, st.text_k_audio, st.text_v_audio) + attention(
            apply_rope(qa, cos_a, sin_a), st.fusion_k[:, :s.video_kv_len], st.fusion_v[:, :s.video_kv_len])
        A = A + ca.o(o.flatten(2))
        A = _gated(A, ba.ffn(_modulate(ba.norm2, A, ma[3], ma[4], na)), ma[5], na)

    # video cross: text + the audio sequence after its self-attention (A0), scratch K/V
    cv = bv.cross_attn
    qv = cv.query(bv.norm3(V))
    kf, vf = cv.fusion_kv(A0)
    o = attention(qv, st.text_k_video, st.text_v_video) + attention(
        apply_rope(qv, cos_v, sin_v), apply_rope(kf, cos_a, sin_a), vf)
    V = V + cv.o(o.flatten(2))
    V = _gated(V, bv.ffn(_modulate(bv.norm2, V, mv[3], mv[4], nf)), mv[5], nf)
    return V, A


def compile_dual_layer(backend="inductor", **options):
    """``dual_layer`` under ``torch.compile(fullgraph=True, dynamic=False)``: one graph per distinct
    ``LayerStatic`` (and input shapes), shared by every layer. ``backend`` may be a callable that wraps
    inductor (e.g. to count and time compilations; ``runtime/backends/compiled.py``)."""
    return torch.compile(dual_layer, backend=backend, fullgraph=True, dynamic=False, **options)
