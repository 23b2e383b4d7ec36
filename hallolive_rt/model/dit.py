"""The dual-stream causal DiT of Hallo-Live: a video stream and an audio stream fused in every layer.

State-dict names equal the checkpoint's after its ``model.`` prefix: ``video_model.*``, ``audio_model.*``.
One forward denoises one block: the video block's tokens (incremental, written into the video caches at
``pos.video_slot``) and the whole audio sequence from position 0 (recomputed every forward, as released).

Per layer (docs/FACTS.md section 2):
    A += g1a * self_attn_a(...)            V += g1v * self_attn_v(...)      (video attends its cache)
    A0 = A
    A += cross_a(norm3(A), text, V)        audio sees video after its self-attention (fusion cache)
    A += g2a * ffn_a(...)
    V += cross_v(norm3(V), text, A0)       video sees audio after self-attention, before audio cross/ffn
    V += g2v * ffn_v(...)
Nothing here syncs the host: positions and offsets are tensors, every size is static per variant.

Two opt-in fast paths, off by default until a GPU measurement says they pay (``hallolive-rt bench``):
``fuse_projections()`` (q/k/v, text k/v and fusion k/v as one GEMM each; ``model/fused.py``) and
``set_attention_kernel()`` (one SDPA kernel for every attention; ``model/attention.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FusionConfig, StreamConfig
from ..state import DiTState, StepPositions
from .attention import attention, attention_kernel, check_attention_kernel
from .fused import FusableProjections
from .layers import ChannelLastConv1d, ConvMLP, FusionLayer, Head
from .rope import RopeTables, apply_rope

__all__ = ["StreamDiT", "DualStreamDiT", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, fp64: bool = True) -> torch.Tensor:
    """cat(cos, sin) of t * 10000^(-k/half), k < half: [N] -> [N, dim] (float64 math as released)."""
    half = dim // 2
    dt = torch.float64 if fp64 else torch.float32
    pos = t.to(dt)
    freq = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=dt) / half)
    ang = torch.outer(pos, freq)
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class StreamDiT(nn.Module):
    """One stream's embeddings, 30 fusion layers and head (``video_model`` / ``audio_model``)."""

    def __init__(self, cfg: StreamConfig, other: StreamConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.dim
        if cfg.is_audio:
            self.patch_embedding = nn.Sequential(
                ChannelLastConv1d(cfg.in_dim, c, 7, padding=3), nn.SiLU(), ConvMLP(c, cfg.patch_embed_hidden, 7))
            out = cfg.out_dim
        else:
            self.patch_embedding = nn.Conv3d(cfg.in_dim, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            out = math.prod(cfg.patch_size) * cfg.out_dim
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(
            FusionLayer(c, other.dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers))
        self.head = Head(c, out, cfg.eps)
        self.rope = RopeTables(cfg)
        self.time_fp64 = True  # exporters for float64-free targets (TensorRT) switch this off

    # ---- embeddings ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, F, Cin, H, W] -> [B, F*h*w, C] (f, h, w row-major); audio [B, L, Cin] -> [B, L, C]."""
        if self.cfg.is_audio:
            return self.patch_embedding(x)
        y = self.patch_embedding(x.transpose(1, 2))  # [B, C, F, h, w]
        return y.flatten(2).transpose(1, 2)

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype):
        """t [B, N] -> e [B, N, C] (head) and e0 [B, N, 6, C] (layer modulation)."""
        b, n = t.shape
        s = sinusoidal_embedding(t.flatten(), self.cfg.freq_dim, fp64=self.time_fp64).to(dtype)
        e = self.time_embedding(s)
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e.view(b, n, -1), e0.view(b, n, 6, -1)

    def unpatchify(self, x: torch.Tensor, frames: int, gh: int, gw: int) -> torch.Tensor:
        """[B, F*h*w, p*q*r*c] (c fastest) -> [B, F, c, h*q, w*r] (the release's frames-first layout)."""
        p, q, r = self.cfg.patch_size
        c = self.cfg.out_dim
        b = x.shape[0]
        u = x.view(b, frames, gh, gw, p, q, r, c)
        u = u.permute(0, 1, 4, 7, 2, 5, 3, 6)  # b f p c h q w r
        return u.reshape(b, frames * p, c, gh * q, gw * r)


class DualStreamDiT(nn.Module):
    """``video_model`` + ``audio_model``; ``forward`` runs one block step on explicit state."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.cfg = cfg
        self.video_model = StreamDiT(cfg.video, cfg.audio)
        self.audio_model = StreamDiT(cfg.audio, cfg.video)
        self._kv = None
        self.attn_kernel = "auto"

    # ---- cache operations (C++ extension or the pure-torch reference) ---------------------------
    @property
    def kv(self):
        if self._kv is None:
            from ..kvcache import get_kv_ops

            self._kv = get_kv_ops("torch")
        return self._kv

    def set_kv_impl(self, impl: str) -> None:
        """``"ext"`` (our C++/CUDA ops) or ``"torch"`` (reference ops); see ``hallolive_rt.kvcache``."""
        from ..kvcache import get_kv_ops

        self._kv = get_kv_ops(impl)

    # ---- opt-in fast paths (see the module docstring) --------------------------------------------------
    def set_attention_kernel(self, kernel: str) -> None:
        """``auto`` (PyTorch picks, as released) or one SDPA kernel: math, flash, cudnn, efficient.
        Probed on the parameters' device and dtype first; one that cannot run there raises ValueError."""
        p = self.video_model.head.head.weight
        check_attention_kernel(kernel, p.device, p.dtype, (self.cfg.video.head_dim, self.cfg.audio.head_dim))
        self.attn_kernel = kernel

    def _fusable(self) -> list[FusableProjections]:
        return [m for m in self.modules() if isinstance(m, FusableProjections)]

    def fuse_projections(self) -> None:
        """One GEMM per group of projections on the same input (names, shapes, values unchanged).
        Call after loading; calling again re-fuses from the current parameters."""
        for m in self._fusable():
            m.fuse_projections()

    def unfuse_projections(self) -> None:
        """Back to the released one-GEMM-per-projection forward (copies nothing)."""
        for m in self._fusable():
            m.unfuse_projections()

    @property
    def projections_fused(self) -> bool:
        return all(m.projections_fused for m in self._fusable())

    def reset_rope(self) -> None:
        """Rebuild RoPE tables (not in the checkpoint) on the parameters' device after a meta load."""
        dev = self.video_model.head.head.weight.device
        with torch.device(dev):
            self.video_model.rope.reset_tables()
            self.audio_model.rope.reset_tables()

    # ---- per-prompt text K/V ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare_text(self, ctx: torch.Tensor, state: DiTState) -> None:
        """ctx [B, T, text_dim] (umT5 output, rows past the prompt zeroed) -> text K/V of every layer."""
        for model, ks, vs in ((self.video_model, state.text_k_video, state.text_v_video),
                              (self.audio_model, state.text_k_audio, state.text_v_audio)):
            emb = model.text_embedding(ctx.to(ks.dtype))
            for i, blk in enumerate(model.blocks):
                k, v = blk.cross_attn.text_kv(emb)
                ks[i].copy_(k)
                vs[i].copy_(v)

    # ---- one block step --------------------------------------------------------------------------
    def forward(self, vid_x: torch.Tensor, aud_x: torch.Tensor, vid_t: torch.Tensor, aud_t: torch.Tensor,
                state: DiTState, pos: StepPositions, video_kv_len: int):
        """One denoising (or t=0 context) forward of a block.

        vid_x [B, Fb, Cv, Hl, Wl] noisy video block; aud_x [B, La, Ca] whole audio sequence from position 0;
        vid_t [B, Fb], aud_t [B, La] float timesteps; ``video_kv_len`` (static) cache rows attended,
        the block's own rows included. Returns flow predictions shaped like vid_x and aud_x.
        """
        with attention_kernel(self.attn_kernel):  # a no-op for auto
            return self._forward(vid_x, aud_x, vid_t, aud_t, state, pos, video_kv_len)

    def _forward(self, vid_x, aud_x, vid_t, aud_t, state: DiTState, pos: StepPositions, video_kv_len: int):
        vm, am = self.video_model, self.audio_model
        b, nf, _, lh, lw = vid_x.shape
        gh, gw = lh // vm.cfg.patch_size[1], lw // vm.cfg.patch_size[2]
        dtype = state.video_k.dtype
        lay = state.layout
        kv = self.kv

        V = vm.embed(vid_x.to(dtype))  # [B, Nv, C]
        A = am.embed(aud_x.to(dtype))  # [B, La, C]
        ev, e0v = vm.embed_time(vid_t, dtype)  # [B, Fb, C], [B, Fb, 6, C]
        ea, e0a = am.embed_time(aud_t, dtype)  # [B, La, C], [B, La, 6, C]
        na = A.shape[1]
        cos_v, sin_v = vm.rope.video(pos.video_frame_pos, gh, gw)  # [Nv, D/2]
        cos_a, sin_a = am.rope.audio(pos.audio_pos)  # [La, D/2]

        def modulate(norm, x, shift, scale, groups):
            return (norm(x).unflatten(1, (groups, -1)) * (1 + scale) + shift).flatten(1, 2)

        def gated(x, y, gate, groups):
            return x + (y.unflatten(1, (groups, -1)) * gate).flatten(1, 2)

        for i, (bv, ba) in enumerate(zip(vm.blocks, am.blocks)):
            mv, ma = bv.mod(e0v), ba.mod(e0a)

            # audio self-attention: the whole sequence, recomputed from position 0 (scratch K/V)
            q, k, v = ba.self_attn.qkv(modulate(ba.norm1, A, ma[0], ma[1], na))
            y = attention(apply_rope(q, cos_a, sin_a), apply_rope(k, cos_a, sin_a), v)
            A = gated(A, ba.self_attn.o(y.flatten(2)), ma[2], na)

            # video self-attention: write the block's RoPE'd K/V into the cache, attend to rows [0, kv_len)
            q, k, v = bv.self_attn.qkv(modulate(bv.norm1, V, mv[0], mv[1], nf))
            kc, vc = state.video_k[i], state.video_v[i]
            kv.rope_write_block(kc, k, cos_v, sin_v, pos.video_slot, lay.sink, lay.ring)
            kv.write_block(vc, v, pos.video_slot, lay.sink, lay.ring)
            y = attention(apply_rope(q, cos_v, sin_v), kc[:, :video_kv_len], vc[:, :video_kv_len])
            V = gated(V, bv.self_attn.o(y.flatten(2)), mv[2], nf)

            A0 = A
            # audio cross: text + video tokens through the fusion cache (RoPE'd with video positions)
            ca = ba.cross_attn
            xa = ba.norm3(A)
            qa = ca.query(xa)
            kf, vf = ca.fusion_kv(V)
            fk, fv = state.fusion_k[i], state.fusion_v[i]
            kv.rope_write_block(fk, kf, cos_v, sin_v, pos.video_slot, lay.sink, lay.ring)
            kv.write_block(fv, vf, pos.video_slot, lay.sink, lay.ring)
            o = attention(qa, state.text_k_audio[i], state.text_v_audio[i]) + attention(
                apply_rope(qa, cos_a, sin_a), fk[:, :video_kv_len], fv[:, :video_kv_len])
            A = A + ca.o(o.flatten(2))
            A = gated(A, ba.ffn(modulate(ba.norm2, A, ma[3], ma[4], na)), ma[5], na)

            # video cross: text + the audio sequence after its self-attention (A0), scratch K/V
            cv = bv.cross_attn
            qv = cv.query(bv.norm3(V))
            kf, vf = cv.fusion_kv(A0)
            o = attention(qv, state.text_k_video[i], state.text_v_video[i]) + attention(
                apply_rope(qv, cos_v, sin_v), apply_rope(kf, cos_a, sin_a), vf)
            V = V + cv.o(o.flatten(2))
            V = gated(V, bv.ffn(modulate(bv.norm2, V, mv[3], mv[4], nf)), mv[5], nf)

        flow_v = vm.unpatchify(vm.head(V, ev, nf), nf, gh, gw)  # [B, Fb, Cv, Hl, Wl]
        flow_a = am.head(A, ea, na)  # [B, La, Ca]
        return flow_v, flow_a
