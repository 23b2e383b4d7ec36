"""The streaming block loop of Hallo-Live on explicit state: per block, 4 denoising forwards of the video
block xv [B, Fb, Cv, h, w] and the audio window xa [B, La, Ca] with fresh re-noise between them, the commit
of x0, then one t = 0 forward that leaves the block's clean K/V in the caches. ``BlockStream`` runs blocks
one at a time with a swappable DiT step (so every backend reuses this loop); ``generate`` runs N blocks and
returns every committed latent. The loop step by step: ``docs/ARCHITECTURE.md``, "The block loop"."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from .cache_policy import AppendPolicy, BlockPlan, RollingPolicy, choose_policy
from .model.dit import DualStreamDiT
from .profile import Profile
from .sampler import NoiseSource, Schedule, renoise, x0_from_flow
from .state import DiTState, StepPositions

__all__ = ["BlockStream", "BlockOutput", "ForwardRecord", "StreamResult", "generate", "Cursor", "window_noise",
           "whole_blocks"]


@dataclass
class ForwardRecord:
    """One DiT forward for diagnosis: its inputs, the flow it predicted and the x0 derived from it."""

    block: int
    step: int  # 0..steps-1 denoising, ``steps`` = the t=0 context pass
    vid_in: torch.Tensor
    aud_in: torch.Tensor
    vid_t: torch.Tensor
    aud_t: torch.Tensor
    flow_v: torch.Tensor | None  # None for a lean context pass
    flow_a: torch.Tensor | None
    x0_v: torch.Tensor | None
    x0_a: torch.Tensor | None


@dataclass
class BlockOutput:
    index: int
    video: torch.Tensor  # committed x0 [B, Fb, Cv, Hl, Wl]
    audio: torch.Tensor  # committed x0 [B, 30, Ca]
    audio_future: torch.Tensor  # denoised lookahead tokens [B, F, Ca] (not committed; for audio decode)
    plan: BlockPlan
    records: list[ForwardRecord] = field(default_factory=list)


@dataclass
class StreamResult:
    video: torch.Tensor  # [B, blocks*Fb, Cv, Hl, Wl]
    audio: torch.Tensor  # [B, blocks*30, Ca]
    records: list[ForwardRecord]


class Cursor:
    """Device buffers for per-block positions, written with ``fill_`` (no host sync), read in-graph."""

    def __init__(self, device):
        self.video_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.frame0 = torch.zeros(1, dtype=torch.long, device=device)
        self.audio0 = torch.zeros(1, dtype=torch.long, device=device)

    def set(self, plan: BlockPlan) -> None:
        self.video_slot.fill_(plan.video_slot)
        self.frame0.fill_(plan.frame0)
        self.audio0.fill_(plan.audio0)

    def positions(self, frames: int, audio_len: int) -> StepPositions:
        dev = self.frame0.device
        return StepPositions(self.frame0 + torch.arange(frames, device=dev),
                             self.audio0 + torch.arange(audio_len, device=dev), self.video_slot)


def window_noise(blocks_noise: Callable[[int], torch.Tensor], i: int, n_blocks: int | None,
                 tokens_per_block: int, window: int) -> torch.Tensor:
    """The W-token noise window of block i: this block's and the next blocks' noise, padded past the
    end of the stream with this block's noise (as released)."""
    parts, have, j = [], 0, i
    while have < window and (n_blocks is None or j < n_blocks):
        parts.append(blocks_noise(j))
        have += tokens_per_block
        j += 1
    own = blocks_noise(i)
    while have < window:
        parts.append(own)
        have += tokens_per_block
    return torch.cat(parts, dim=1)[:, :window]


class BlockStream:
    """One stream session: state, cursor, policy and the per-block loop around a DiT step."""

    def __init__(self, dit: DualStreamDiT, profile: Profile, *, blocks: int | None = None,
                 policy: AppendPolicy | RollingPolicy | None = None, device=None, dtype=None,
                 state: DiTState | None = None):
        self.dit = dit
        self.p = profile
        self.device = torch.device(device) if device is not None else dit.video_model.head.head.weight.device
        self.dtype = dtype or profile.dtype
        self.policy = policy or choose_policy(profile, blocks if blocks is not None else profile.stream.blocks)
        self.schedule = Schedule.from_profile(profile)
        self.state = state or DiTState.allocate(dit.cfg, profile, self.policy.layout(), device=self.device,
                                                dtype=self.dtype)
        self.cursor = Cursor(self.device)
        # the block denoised whose context pass has not run yet: (its output, the whole re-predicted audio
        # sequence x0a, whether to record); None between blocks
        self._pending: tuple[BlockOutput, torch.Tensor, bool] | None = None
        self.step_fn: Callable = self.eager_step
        # opt-in: the t = 0 pass computes only what reaches a cache and returns no flow (its plan carries
        # context=True; backends that run the PyTorch forward honour it, compiled artifacts ignore it)
        self.lean_context = False

    # ---- the DiT call a backend may replace (same arguments, same results) -----------------------
    def eager_step(self, xv, xa, vt, at, plan: BlockPlan):
        pos = self.cursor.positions(xv.shape[1], xa.shape[1])
        return self.dit(xv, xa, vt, at, self.state, pos, plan.video_kv_len, context=plan.context)

    def start(self, ctx: torch.Tensor) -> None:
        """New stream: zero the caches in place and compute the prompt's text K/V."""
        self.state.reset()
        self._pending = None
        self.dit.prepare_text(ctx.to(self.device), self.state)
        self._audio_hist = torch.zeros(self.p.stream.batch, 0, self.p.audio.latent_channels,
                                       device=self.device, dtype=self.dtype)
        self._audio_hist_start = 0

    def _rebase(self, frames: int) -> None:
        """Rotate every cached video key of the ring back by ``frames`` latent frames (RoPE composes)."""
        lay = self.state.layout
        rope = self.dit.video_model.rope
        cos, sin = rope.frame_shift(-frames, lay.ring)  # [ring, D/2]
        for cache in (self.state.video_k, self.state.fusion_k):
            for layer in cache:
                self.dit.kv.rerotate(layer, cos, sin, lay.sink, lay.ring)

    def run_block(self, plan: BlockPlan, xv: torch.Tensor, win: torch.Tensor, noise: NoiseSource,
                  record: bool = False) -> BlockOutput:
        """One block: its denoising steps, then the context pass that refreshes the caches for the next.
        xv [B, Fb, Cv, Hl, Wl] initial noise, win [B, W, Ca] audio window noise."""
        out = self.denoise_block(plan, xv, win, noise, record)
        self.refresh_caches(out)
        return out

    @torch.no_grad()
    def denoise_block(self, plan: BlockPlan, xv: torch.Tensor, win: torch.Tensor, noise: NoiseSource,
                      record: bool = False) -> BlockOutput:
        """The denoising steps of one block: its committed latents, all the decoders need, before the
        context pass. ``refresh_caches(out)`` must follow before the next block (a session hands ``out``
        to the decoders in between, so the first frames are decoded while the caches are refreshed)."""
        if self._pending is not None:
            raise RuntimeError(f"block {self._pending[0].index}'s caches were not refreshed: call "
                               f"refresh_caches(out) after denoise_block, before the next block")
        sch, na = self.schedule, self.p.stream.audio_tokens_per_block
        if plan.rebase_frames:
            self._rebase(plan.rebase_frames)
        self.cursor.set(plan)
        # committed history fed this block: global tokens [audio_start, 30 i)
        hist = self._audio_hist[:, plan.audio_start - self._audio_hist_start:]
        h = hist.shape[1]
        xv = xv.to(self.device, self.dtype)
        xa_win = win.to(self.device, self.dtype)
        xa = torch.cat([hist, xa_win], dim=1)
        b, nf, w = xv.shape[0], xv.shape[1], xa_win.shape[1]
        hist_t = torch.zeros(b, h, device=self.device)
        # per-token sigma of the x0 conversion: sigma(0) for the history, the step's sigma for the window
        sig_a = torch.full((1, h + w, 1), sch.context_sigma, device=self.device, dtype=torch.float64)
        records = []
        x0v = x0a = None
        for k, (t, sigma) in enumerate(zip(sch.timesteps, sch.sigmas)):
            vt = torch.full((b, nf), t, device=self.device)
            at = torch.cat([hist_t, torch.full((b, w), t, device=self.device)], dim=1)
            fv, fa = self.step_fn(xv, xa, vt, at, plan)
            x0v = x0_from_flow(xv, fv, sigma)
            sig_a[:, h:].fill_(sigma)
            x0a = x0_from_flow(xa, fa, sig_a)
            if record:
                records.append(ForwardRecord(plan.index, k, xv, xa, vt, at, fv, fa, x0v, x0a))
            if k + 1 < sch.steps:
                nxt = sch.sigmas[k + 1]
                xv = renoise(x0v, noise.video(x0v), nxt)
                xa = torch.cat([hist, renoise(x0a[:, h:], noise.audio(x0a[:, h:]), nxt)], dim=1)
        out = BlockOutput(plan.index, x0v, x0a[:, h:h + na], x0a[:, h + na:], plan, records)
        self._pending = (out, x0a, record)
        return out

    @torch.no_grad()
    def refresh_caches(self, out: BlockOutput) -> None:
        """The context pass of ``out``'s block: the DiT at t = 0 on the clean block and the re-predicted
        audio sequence, which writes the caches the next block attends to; then the committed audio joins
        the history. The block's latents are only read."""
        if self._pending is None or self._pending[0] is not out:
            raise RuntimeError(f"block {out.index}: refresh_caches takes the output of the last denoise_block, "
                               f"once")
        _, x0a, record = self._pending
        plan, x0v = out.plan, out.video
        b, nf = x0v.shape[0], x0v.shape[1]
        vt0 = torch.zeros(b, nf, device=self.device)
        at0 = torch.zeros(b, x0a.shape[1], device=self.device)
        fv, fa = self.step_fn(x0v, x0a, vt0, at0, replace(plan, context=True) if self.lean_context else plan)
        if record:  # a lean context pass has no flows (None)
            out.records.append(ForwardRecord(plan.index, self.schedule.steps, x0v, x0a, vt0, at0, fv, fa,
                                             None, None))
        self._commit_audio(plan, out.audio)
        self._pending = None

    def _commit_audio(self, plan: BlockPlan, committed: torch.Tensor) -> None:
        """Keep only the history the policy will still feed (bounded for rolling streams)."""
        hist = torch.cat([self._audio_hist, committed], dim=1)
        keep_from = getattr(self.policy, "hist", None)
        if keep_from is not None:
            drop = max(0, hist.shape[1] - keep_from)
            hist = hist[:, drop:]
            self._audio_hist_start += drop
        self._audio_hist = hist

    def run(self, ctx: torch.Tensor, video_noise: Callable[[int], torch.Tensor],
            audio_noise: Callable[[int], torch.Tensor], noise: NoiseSource, *,
            record: bool = False) -> Iterator[BlockOutput]:
        """Yield blocks as they finish. ``video_noise(i)`` / ``audio_noise(i)`` give block i's initial noise."""
        self.start(ctx)
        n = self.policy.blocks
        for plan in self.policy.plans():
            win = window_noise(audio_noise, plan.index, n, self.p.stream.audio_tokens_per_block, self.p.audio_window)
            yield self.run_block(plan, video_noise(plan.index), win, noise, record)


def whole_blocks(profile: Profile, noise_v: torch.Tensor, noise_a: torch.Tensor) -> int:
    """How many blocks ``noise_v`` [B, N*Fb, ...] / ``noise_a`` [B, N*30, Ca] hold (``ValueError`` if not whole)."""
    fb, na = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    n = noise_v.shape[1] // fb
    if n < 1 or noise_v.shape[1] != n * fb or noise_a.shape[1] != n * na:
        raise ValueError(f"noise shapes {tuple(noise_v.shape)} / {tuple(noise_a.shape)} are not whole blocks "
                         f"of {fb} latent frames / {na} audio tokens")
    return n


def generate(dit: DualStreamDiT, profile: Profile, ctx: torch.Tensor, noise_v: torch.Tensor,
             noise_a: torch.Tensor, noise: NoiseSource, *, record: bool = False,
             policy=None, step_fn: Callable | None = None, lean_context: bool = False) -> StreamResult:
    """Run every block of ``noise_v`` [B, N*Fb, Cv, Hl, Wl] / ``noise_a`` [B, N*30, Ca] and return the
    committed latents (and, with ``record``, every forward's inputs, flow and x0)."""
    fb, na = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    n = whole_blocks(profile, noise_v, noise_a)
    bs = BlockStream(dit, profile, blocks=n, policy=policy, device=noise_v.device)
    bs.lean_context = lean_context
    if step_fn is not None:
        bs.step_fn = step_fn
    outs = list(bs.run(ctx, lambda i: noise_v[:, i * fb:(i + 1) * fb], lambda i: noise_a[:, i * na:(i + 1) * na],
                       noise, record=record))
    return StreamResult(torch.cat([o.video for o in outs], 1), torch.cat([o.audio for o in outs], 1),
                        [r for o in outs for r in o.records])
