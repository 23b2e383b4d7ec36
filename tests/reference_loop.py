"""A deliberately simple reference of the Hallo-Live streaming loop, written for readability.

Growing caches built with ``torch.cat``, Python-int offsets, no static buffers, RoPE in complex128
exactly as the release writes it (``torch.polar`` tables, ``view_as_complex``), the schedule looked up
by nearest timestep in the 1000-entry table. It reuses only the DiT's weights (its Linear/Norm layers);
the caching, positions, attention and sampler are written again here, independently of the runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hallolive_rt.model.dit import DualStreamDiT


# ---- RoPE, the release's complex formulation ------------------------------------------------------
def rope_params(max_len: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    freqs = scale / torch.pow(10000.0, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    ang = torch.outer(torch.arange(max_len).to(torch.float64), freqs)
    return torch.polar(torch.ones_like(ang), ang)


def video_freqs(head_dim: int) -> torch.Tensor:
    d = head_dim
    return torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                      rope_params(1024, 2 * (d // 6))], dim=1)


def audio_freqs(head_dim: int, scale: float) -> torch.Tensor:
    d = head_dim
    return rope_params(1024, d - 4 * (d // 6), scale)


def rope_3d(x, start_frame, f, h, w, freqs):
    n, c = x.size(2), x.size(3) // 2
    fr = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(x.shape[0], f * h * w, n, -1, 2))
    fi = torch.cat([fr[0][start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                    fr[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                    fr[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    return torch.view_as_real(xc * fi).flatten(3).type_as(x)


def rope_1d(x, start, freqs):
    b, length, n, d = x.shape
    c_rope = freqs.shape[1]
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, length, n, -1, 2))
    rot = xc[:, :, :, :c_rope] * freqs[start:start + length, None, :]
    return torch.view_as_real(torch.cat([rot, xc[:, :, :, c_rope:]], dim=3)).flatten(3).type_as(x)


def attend(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# ---- the dual-stream forward with growing caches -------------------------------------------------
class ReferenceDiT:
    def __init__(self, dit: DualStreamDiT):
        self.m = dit
        self.vf = video_freqs(dit.cfg.video.head_dim)
        self.af = audio_freqs(dit.cfg.audio.head_dim, dit.cfg.audio.temporal_rope_scaling_factor)
        self.caches = [dict(vk=None, vv=None, fk=None, fv=None) for _ in range(dit.cfg.num_layers)]

    @staticmethod
    def _put(cache, name, start, new):
        """Write rows [start, start+len) of a growing cache: keep rows before start, then the new rows."""
        old = cache[name]
        cache[name] = new if old is None else torch.cat([old[:, :start], new], dim=1)
        return cache[name]

    def time(self, model, t):
        half = model.cfg.freq_dim // 2
        pos = t.flatten().to(torch.float64)
        sinus = torch.outer(pos, torch.pow(10000, -torch.arange(half).to(pos).div(half)))
        emb = torch.cat([torch.cos(sinus), torch.sin(sinus)], dim=1).to(model.head.head.weight.dtype)
        e = model.time_embedding(emb)
        e0 = model.time_projection(e).unflatten(1, (6, model.cfg.dim)).unflatten(0, t.shape)
        return e.unflatten(0, t.shape), e0

    def forward(self, xv, xa, vt, at, ctx, video_start_frame: int):
        vm, am = self.m.video_model, self.m.audio_model
        b, f, _, lh, lw = xv.shape
        h, w = lh // 2, lw // 2
        tpf = h * w
        start = video_start_frame * tpf
        V = vm.patch_embedding(xv.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)
        A = am.patch_embedding(xa)
        ev, e0v = self.time(vm, vt)
        ea, e0a = self.time(am, at)
        ctx_v, ctx_a = vm.text_embedding(ctx), am.text_embedding(ctx)
        la = A.shape[1]
        nh_v, nh_a = self.m.cfg.video.num_heads, self.m.cfg.audio.num_heads

        def heads(x, n):
            return x.view(x.shape[0], x.shape[1], n, -1)

        for i, (bv, ba) in enumerate(zip(vm.blocks, am.blocks)):
            c = self.caches[i]
            ma = (ba.modulation.modulation.unsqueeze(1) + e0a).chunk(6, dim=2)
            mv = (bv.modulation.modulation.unsqueeze(1) + e0v).chunk(6, dim=2)
            # audio self-attention over the whole audio sequence
            xin = (ba.norm1(A).unflatten(1, (la, 1)) * (1 + ma[1]) + ma[0]).flatten(1, 2)
            sa = ba.self_attn
            q, k, v = heads(sa.norm_q(sa.q(xin)), nh_a), heads(sa.norm_k(sa.k(xin)), nh_a), heads(sa.v(xin), nh_a)
            y = attend(rope_1d(q, 0, self.af), rope_1d(k, 0, self.af), v)
            A = A + (sa.o(y.flatten(2)).unflatten(1, (la, 1)) * ma[2]).flatten(1, 2)
            # video self-attention with the growing cache
            xin = (bv.norm1(V).unflatten(1, (f, tpf)) * (1 + mv[1]) + mv[0]).flatten(1, 2)
            sv = bv.self_attn
            q, k, v = heads(sv.norm_q(sv.q(xin)), nh_v), heads(sv.norm_k(sv.k(xin)), nh_v), heads(sv.v(xin), nh_v)
            kc = self._put(c, "vk", start, rope_3d(k, video_start_frame, f, h, w, self.vf))
            vc = self._put(c, "vv", start, v)
            y = attend(rope_3d(q, video_start_frame, f, h, w, self.vf), kc, vc)
            V = V + (sv.o(y.flatten(2)).unflatten(1, (f, tpf)) * mv[2]).flatten(1, 2)
            A0 = A
            # audio cross-attention: text + video (fusion cache)
            ca = ba.cross_attn
            xq = ba.norm3(A)
            q = heads(ca.norm_q(ca.q(xq)), nh_a)
            o_text = attend(q, heads(ca.norm_k(ca.k(ctx_a)), nh_a), heads(ca.v(ctx_a), nh_a))
            tgt = ca.pre_attn_norm_fusion(V)
            kf = rope_3d(heads(ca.norm_k_fusion(ca.k_fusion(tgt)), nh_a), video_start_frame, f, h, w, self.vf)
            fk = self._put(c, "fk", start, kf)
            fv = self._put(c, "fv", start, heads(ca.v_fusion(tgt), nh_a))
            o_fus = attend(rope_1d(q, 0, self.af), fk, fv)
            A = A + ca.o((o_text + o_fus).flatten(2))
            y = ba.ffn((ba.norm2(A).unflatten(1, (la, 1)) * (1 + ma[4]) + ma[3]).flatten(1, 2))
            A = A + (y.unflatten(1, (la, 1)) * ma[5]).flatten(1, 2)
            # video cross-attention: text + the audio sequence after self-attention
            cv = bv.cross_attn
            xq = bv.norm3(V)
            q = heads(cv.norm_q(cv.q(xq)), nh_v)
            o_text = attend(q, heads(cv.norm_k(cv.k(ctx_v)), nh_v), heads(cv.v(ctx_v), nh_v))
            tgt = cv.pre_attn_norm_fusion(A0)
            kf = rope_1d(heads(cv.norm_k_fusion(cv.k_fusion(tgt)), nh_v), 0, self.af)
            o_fus = attend(rope_3d(q, video_start_frame, f, h, w, self.vf), kf, heads(cv.v_fusion(tgt), nh_v))
            V = V + cv.o((o_text + o_fus).flatten(2))
            y = bv.ffn((bv.norm2(V).unflatten(1, (f, tpf)) * (1 + mv[4]) + mv[3]).flatten(1, 2))
            V = V + (y.unflatten(1, (f, tpf)) * mv[5]).flatten(1, 2)

        # heads + unpatchify (release: einsum fhwpqrc->cfphqwr), back to frames-first
        sv_, scv = (vm.head.modulation.unsqueeze(1) + ev.unsqueeze(2)).chunk(2, dim=2)
        ov = vm.head.head(vm.head.norm(V).unflatten(1, (f, tpf)) * (1 + scv) + sv_)
        c_out = self.m.cfg.video.out_dim
        u = ov.reshape(b, f, h, w, 1, 2, 2, c_out)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(b, c_out, f, lh, lw).permute(0, 2, 1, 3, 4)
        sa_, sca = (am.head.modulation.unsqueeze(1) + ea.unsqueeze(2)).chunk(2, dim=2)
        oa = am.head.head(am.head.norm(A).unflatten(1, (la, 1)) * (1 + sca) + sa_).flatten(1, 2)
        return u, oa


# ---- the release's scheduler, by table lookup ----------------------------------------------------
class ReferenceScheduler:
    def __init__(self, shift=5.0, n=1000):
        s = torch.linspace(1.0, 0.0, n + 1)[:-1]
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = self.sigmas * n
        table = torch.cat([self.timesteps, torch.tensor([0.0])])
        self.steps = table[n - torch.tensor([1000, 750, 500, 250])]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        idx = torch.argmin((self.timesteps.double().unsqueeze(0) - t.double().flatten().unsqueeze(1)).abs(), dim=1)
        return self.sigmas.double()[idx].view(t.shape)

    def x0(self, flow, xt, t):
        s = self.sigma(t)
        s = s.view(*s.shape, *([1] * (flow.dim() - s.dim())))
        return (xt.double() - s * flow.double()).to(flow.dtype)

    def add_noise(self, x0, eps, t):
        s = self.sigmas[torch.argmin((self.timesteps - t).abs())]
        return ((1 - s) * x0 + s * eps).type_as(eps)


def reference_generate(dit, ctx, noise_v, noise_a, noise, *, frames_per_block, tokens_per_block, future):
    """The release's block loop (dual_stream_causal_inference.py), written plainly."""
    sch = ReferenceScheduler()
    ref = ReferenceDiT(dit)
    b = noise_v.shape[0]
    nblocks = noise_v.shape[1] // frames_per_block
    audio_out = noise_a.new_zeros(noise_a.shape)
    video_out = noise_v.new_zeros(noise_v.shape)
    x0s = []
    for i in range(nblocks):
        f0, a0 = i * frames_per_block, i * tokens_per_block
        a_end, win = a0 + tokens_per_block, tokens_per_block + future
        xv = noise_v[:, f0:f0 + frames_per_block]
        window = noise_a[:, a0:a_end + future]
        own = noise_a[:, a0:a_end]
        while window.shape[1] < win:
            window = torch.cat([window, own[:, :min(win - window.shape[1], own.shape[1])]], dim=1)
        hist = audio_out[:, :a0]
        xa = torch.cat([hist, window], dim=1)
        for k, t in enumerate(sch.steps):
            vt = torch.ones(b, frames_per_block) * t
            at = torch.cat([torch.zeros(b, a0), torch.ones(b, win) * t], dim=1)
            fv, fa = ref.forward(xv, xa, vt, at, ctx, f0)
            x0v = sch.x0(fv, xv, vt)
            x0a = sch.x0(fa, xa, at)
            x0s.append((x0v, x0a))
            if k < len(sch.steps) - 1:
                nt = sch.steps[k + 1]
                xv = sch.add_noise(x0v, noise.video(x0v), nt)
                xa = torch.cat([hist, sch.add_noise(x0a[:, a0:], noise.audio(x0a[:, a0:]), nt)], dim=1)
        video_out[:, f0:f0 + frames_per_block] = x0v
        audio_out[:, a0:a_end] = x0a[:, a0:a_end]
        ref.forward(x0v, x0a[:, :a_end + future], torch.zeros(b, frames_per_block),
                    torch.zeros(b, a_end + future), ctx, f0)
    return video_out, audio_out, x0s


__all__ = ["ReferenceDiT", "ReferenceScheduler", "reference_generate"]
