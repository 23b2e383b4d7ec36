"""The dual-stream causal DiT of Hallo-Live (``video_model.*``, ``audio_model.*``: the checkpoint's names
after ``model.``). One forward denoises one block: the video block's tokens (written into the video caches
at ``pos.video_slot``) and the whole audio sequence, every layer running ``dual_layer``; the fast paths
(``fuse_projections``, ``set_attention_kernel``, ``quantize_fp8``, ``context=True``) are opt-in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import FusionConfig, StreamConfig
from ..state import DiTState, StepPositions
from .attention import check_attention_kernel
from .dual_layer import LayerState, LayerStatic, context_parts, dual_layer
from .fused import FusableProjections
from .layers import ChannelLastConv1d, ConvMLP, FusionLayer, Head
from .rope import RopeTables

__all__ = ["StreamDiT", "DualStreamDiT", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, fp64: bool = True) -> torch.Tensor:
    """cat(cos, sin) of t * 10000^(-k/half), k < half: [N] -> [N, dim] (float64 math as released)."""
    half = dim // 2
    dt = torch.float64 if fp64 else torch.float32
    freq = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=dt) / half)
    ang = torch.outer(t.to(dt), freq)
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
        self.layer_fn = None  # None: dual_layer eagerly; a compiled dual_layer (runtime/backends/compiled.py)
        self.fp8: dict | None = None  # what quantize_fp8 did (None: the released precision)

    # ---- cache operations (C++ extension or the pure-torch reference) ---------------------------
    @property
    def kv(self):
        if self._kv is None:
            self.set_kv_impl("torch")
        return self._kv

    def set_kv_impl(self, impl: str) -> None:
        """``"ext"`` (our C++/CUDA ops) or ``"torch"`` (reference ops); see ``hallolive_rt.kvcache``."""
        from ..kvcache import get_kv_ops

        self._kv = get_kv_ops(impl)

    # ---- opt-in fast paths (see the module docstring) --------------------------------------------------
    def set_attention_kernel(self, kernel: str) -> None:
        """``auto`` (PyTorch picks, as released) or one SDPA kernel: math, flash, cudnn, efficient.
        Probed on the parameters' device and dtype first; one that cannot run there raises ValueError."""
        p = self.video_model.patch_embedding.weight  # a conv: never float8
        check_attention_kernel(kernel, p.device, p.dtype, (self.cfg.video.head_dim, self.cfg.audio.head_dim))
        self.attn_kernel = kernel

    def _fusable(self) -> list[FusableProjections]:
        return [m for m in self.modules() if isinstance(m, FusableProjections)]

    def fuse_projections(self) -> None:
        """One GEMM per group of projections on the same input (names, shapes, values unchanged).
        Call after loading; calling again re-fuses from the current parameters."""
        self._set_projections(fused=True)

    def unfuse_projections(self) -> None:
        """Back to the released one-GEMM-per-projection forward (copies nothing)."""
        self._set_projections(fused=False)

    def _set_projections(self, fused: bool) -> None:
        if self.fp8 is not None:  # quantize_fp8 fixed the layout: the same one is a no-op, another is refused
            if self.projections_fused != fused:
                now = "fused" if self.projections_fused else "unfused"
                raise ValueError(f"this DiT was quantized to float8 with its projections {now}; the layout cannot "
                                 f"change any more: load the DiT again (or keep --{'' if now == 'fused' else 'no-'}"
                                 f"fuse-projections with --precision fp8)")
            return
        for m in self._fusable():
            if fused:
                m.fuse_projections()
            else:
                m.unfuse_projections()

    def quantize_fp8(self, *, act_scale: str = "token", impl: str = "auto") -> dict:
        """``--precision fp8``: every eligible Linear as float8 e4m3 rows with per-row scales and dynamic
        activation scales (``model/fp8.py``), in place and for good (the bf16 weights are dropped). Fuse
        projections first if wanted. Calling it again with the same options is a no-op; returns ``self.fp8``."""
        from .fp8 import quantize_linears, resolve_fp8_impl

        p = self.video_model.patch_embedding.weight  # a conv: never quantized
        if self.fp8 is not None:
            if (self.fp8["act_scale"], self.fp8["impl_asked"]) != (act_scale, impl):
                raise ValueError(f"this DiT is already float8 (act_scale={self.fp8['act_scale']}, impl="
                                 f"{self.fp8['impl_asked']}); load it again for act_scale={act_scale}, impl={impl}")
            return self.fp8
        dtype = p.dtype
        use, why = resolve_fp8_impl(impl, p.device, dtype)
        names = quantize_linears(self, compute_dtype=dtype, act_scale=act_scale, impl=use)
        self.fp8 = {"act_scale": act_scale, "impl_asked": impl, "impl": use, "emulated_because": why,
                    "compute_dtype": str(dtype).removeprefix("torch."), "fused_projections": self.projections_fused,
                    "linears_fp8": len(names["quantized"]), "linears_kept": names["kept"]}
        return self.fp8

    @property
    def projections_fused(self) -> bool:
        return all(m.projections_fused for m in self._fusable())

    def reset_rope(self) -> None:
        """Rebuild RoPE tables (not in the checkpoint) on the parameters' device after a meta load."""
        with torch.device(self.video_model.head.head.weight.device):
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
                state: DiTState, pos: StepPositions, video_kv_len: int, context: bool = False):
        """vid_x [B, Fb, Cv, Hl, Wl] noisy video block, aud_x [B, La, Ca] the whole audio sequence, vid_t
        [B, Fb] / aud_t [B, La] timesteps, ``video_kv_len`` (static) cache rows attended -> flow predictions
        shaped like vid_x and aud_x. ``context=True`` (the lean t=0 context pass) computes only what reaches
        a cache (``context_parts``), leaving bit-identical caches, and returns ``(None, None)``."""
        vm, am = self.video_model, self.audio_model
        b, nf, _, lh, lw = vid_x.shape
        gh, gw = lh // vm.cfg.patch_size[1], lw // vm.cfg.patch_size[2]
        dtype, lay = state.video_k.dtype, state.layout

        V = vm.embed(vid_x.to(dtype))  # [B, Nv, C]
        A = am.embed(aud_x.to(dtype))  # [B, La, C]
        ev, e0v = vm.embed_time(vid_t, dtype)  # [B, Fb, C], [B, Fb, 6, C]
        ea, e0a = am.embed_time(aud_t, dtype)  # [B, La, C], [B, La, 6, C]
        na = A.shape[1]
        rope_v = vm.rope.video(pos.video_frame_pos, gh, gw)  # cos, sin [Nv, D/2]
        rope_a = am.rope.audio(pos.audio_pos)  # [La, D/2]

        parts = context_parts(len(vm.blocks)) if context else ["full"] * len(vm.blocks)
        layer = self.layer_fn or dual_layer
        for i, (bv, ba) in enumerate(zip(vm.blocks, am.blocks)):
            st = LayerState(state.video_k[i], state.video_v[i], state.fusion_k[i], state.fusion_v[i],
                            state.text_k_video[i], state.text_v_video[i], state.text_k_audio[i],
                            state.text_v_audio[i], pos.video_slot)
            static = LayerStatic(nf, na, video_kv_len, lay.sink, lay.ring, self.attn_kernel, parts[i])
            V, A = layer(bv, ba, V, A, e0v, e0a, rope_v, rope_a, st, self.kv, static)

        if context:
            return None, None
        return vm.unpatchify(vm.head(V, ev, nf), nf, gh, gw), am.head(A, ea, na)  # [B, Fb, Cv, Hl, Wl], [B, La, Ca]
