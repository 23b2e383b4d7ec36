"""Cache policies: which cache rows a block writes, how many it attends, where positions start, as one
``BlockPlan`` per block in Python ints (the static numbers of a captured variant, and the per-block ones
the runtime writes into device buffers with ``fill_``, never a host sync). ``AppendPolicy`` is the
release's (exact up to the profile's clip length); ``RollingPolicy`` keeps sink blocks plus a ring and
re-bases RoPE positions, so a stream runs endlessly in constant memory and time: ``docs/ARCHITECTURE.md``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from .model.rope import ROPE_POSITIONS
from .profile import Profile
from .state import CacheLayout

__all__ = ["BlockPlan", "AppendPolicy", "RollingPolicy", "choose_policy", "ENDLESS", "parse_blocks",
           "variant_plans", "check_future_tokens"]

ENDLESS = "endless"  # a block count meaning "no end" (CLI ``--blocks endless``, protocol ``blocks: null``)


@dataclass(frozen=True)
class BlockPlan:
    index: int
    video_slot: int  # first cache row written by this block
    video_kv_len: int  # cache rows attended (static per variant)
    frame0: int  # RoPE position of the block's first latent frame
    audio_start: int  # global index of the first audio token fed to the DiT (history start)
    audio_len: int  # tokens fed: history + window (static per variant)
    audio0: int  # RoPE position of that first token
    rebase_frames: int = 0  # > 0: rotate the ring's cached keys back by this many frames first
    context: bool = False  # set by BlockStream for a lean t = 0 context pass (DualStreamDiT.forward(context=True))

    @property
    def variant(self) -> tuple[int, int]:
        """Static shapes that distinguish captured graphs / exported engines."""
        return self.audio_len, self.video_kv_len


class AppendPolicy:
    """The released caches: sized for the clip, append-only, full audio history."""

    name = "append"

    def __init__(self, profile: Profile, blocks: int | None = None):
        self.p = profile
        self.blocks = blocks if blocks is not None else profile.stream.blocks
        check_future_tokens(self)

    def future_tokens_limit(self) -> tuple[int, str]:
        """The largest lookahead F whose audio positions stay in the RoPE tables, and why: the last block
        feeds the whole history from position 0, then its own window of 30 + F tokens."""
        na = self.p.stream.audio_tokens_per_block
        start = na * (self.blocks - 1)
        why = (f"the last of {self.blocks} blocks (append policy) feeds its {start} tokens of audio history "
               f"from position 0, then its window of {na} + F tokens")
        return ROPE_POSITIONS - start - na, why

    def layout(self) -> CacheLayout:
        # sized for the released clip whatever the stream's length: every N up to it (and the rolling
        # policy past it) allocates the same state, so memory never depends on what a user asks for
        return CacheLayout(slots=max(self.blocks, self.p.stream.blocks) * self.p.video_tokens_per_block)

    def plans(self) -> Iterator[BlockPlan]:
        nv, fb = self.p.video_tokens_per_block, self.p.stream.latent_frames_per_block
        na, w = self.p.stream.audio_tokens_per_block, self.p.audio_window
        for i in range(self.blocks):
            yield BlockPlan(i, i * nv, (i + 1) * nv, i * fb, 0, na * i + w, 0)


class RollingPolicy:
    """Sink + ring window for video, bounded audio history, RoPE re-basing. Endless."""

    name = "rolling"

    def __init__(self, profile: Profile, *, sink_blocks: int = 1, window_blocks: int | None = None,
                 audio_history_tokens: int | None = None, blocks: int | None = None,
                 max_positions: int = ROPE_POSITIONS):
        s = profile.stream
        self.p = profile
        self.blocks = blocks  # None = endless
        self.sink = sink_blocks
        self.window = window_blocks if window_blocks is not None else max(s.blocks - sink_blocks, 2)
        # the audio history may reach back over the ring's earlier blocks, no further: its tokens then
        # always sit at or after the oldest cached ring frame, so their positions stay >= 0 after re-basing
        longest = s.audio_tokens_per_block * (self.window - 1)
        hist = audio_history_tokens if audio_history_tokens is not None else longest
        if hist > longest:
            raise ValueError(f"audio history {hist} is longer than the video ring's earlier blocks ({longest} tokens)")
        if hist % s.audio_tokens_per_block:
            raise ValueError("audio history must be a whole number of blocks")
        self.hist = hist
        self.max_pos = max_positions  # tests lower it to force re-basing early
        span_frames = (self.sink + self.window) * s.latent_frames_per_block
        if span_frames > max_positions:
            raise ValueError(f"sink + window of {span_frames} latent frames do not fit the "
                             f"{max_positions}-position RoPE tables")
        check_future_tokens(self)

    def future_tokens_limit(self) -> tuple[int, str]:
        """The largest lookahead F whose audio positions stay in the model's RoPE tables (``ROPE_POSITIONS``;
        a lowered ``max_positions`` only re-bases earlier), and why. Re-basing keeps a block's video frames
        right after the sink's and the ring's earlier blocks, and its audio window is aligned with its frames
        (5 tokens per frame): the window starts at position 30 (sink + window - 1) however long the stream
        (the bounded history sits before it, over the ring's blocks)."""
        na = self.p.stream.audio_tokens_per_block
        start = na * (self.sink + self.window - 1)
        why = (f"with the rolling policy (sink {self.sink} + ring {self.window} blocks) a block's audio window "
               f"of {na} + F tokens starts at position {start} after re-basing, behind the sink and the "
               f"ring's earlier blocks")
        return ROPE_POSITIONS - start - na, why

    def layout(self) -> CacheLayout:
        nv = self.p.video_tokens_per_block
        return CacheLayout(slots=(self.sink + self.window) * nv, sink=self.sink * nv, ring=self.window * nv)

    def plans(self) -> Iterator[BlockPlan]:
        s = self.p.stream
        nv, fb, na, w = self.p.video_tokens_per_block, s.latent_frames_per_block, s.audio_tokens_per_block, self.p.audio_window
        tpf = na // fb  # audio tokens per latent frame (5)
        rebased = 0  # R: frames subtracted from ring positions so far
        i = 0
        while self.blocks is None or i < self.blocks:
            if i < self.sink + self.window:
                slot, kv_len = i * nv, (i + 1) * nv
            else:
                slot, kv_len = self.sink * nv + ((i - self.sink) % self.window) * nv, (self.sink + self.window) * nv
            a_start = max(0, na * i - self.hist)
            a_len = na * i - a_start + w
            delta = 0
            # re-base when this block's last video frame or last audio token would leave the tables
            if fb * (i + 1) - rebased > self.max_pos or na * i + w - tpf * rebased > self.max_pos:
                oldest = max(self.sink, i - self.window + 1) * fb  # oldest ring frame kept after this write
                delta = (oldest - rebased) - self.sink * fb
                rebased += delta
            yield BlockPlan(i, slot, kv_len, fb * i - rebased, a_start, a_len, a_start - tpf * rebased, delta)
            i += 1


def check_future_tokens(policy: AppendPolicy | RollingPolicy) -> None:
    """Refuse a lookahead F (``future_audio_tokens``) whose audio positions would leave the model's RoPE
    tables: the stream would otherwise fail mid-way (index 1024 out of bounds) with a partial file written."""
    f = policy.p.stream.future_audio_tokens
    limit, why = policy.future_tokens_limit()
    if not 0 <= f <= limit:
        raise ValueError(f"future audio tokens (--future-audio-frames) F = {f} is out of range: F must be in "
                         f"0..{max(limit, 0)} here, because {why}, and the audio RoPE table holds "
                         f"{ROPE_POSITIONS} positions")


def parse_blocks(value: int | str | None) -> int | None:
    """A user's block count -> a positive int, or ``None`` for an endless stream (``"endless"``)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == ENDLESS:
            return None
        with contextlib.suppress(ValueError):  # not a number: refused below, as typed
            value = int(v)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--blocks must be a whole number >= 1 or {ENDLESS!r}, got {value!r}")
    return value


def choose_policy(profile: Profile, blocks: int | None, name: str = "auto"):
    """``append`` up to the profile's released length, ``rolling`` past it or for an endless stream
    (``blocks=None``), or the one asked for. ``profile`` must be the released geometry: its
    ``stream.blocks`` is the clip length the append policy reproduces."""
    clip = profile.stream.blocks
    if name == "append" or (name == "auto" and blocks is not None and blocks <= clip):
        if blocks is None or blocks > clip:
            want = "an endless stream" if blocks is None else f"{blocks} blocks"
            raise ValueError(f"--cache-policy append holds at most {clip} blocks (the released clip); "
                             f"use --cache-policy rolling (or auto) for {want}")
        return AppendPolicy(profile, blocks)
    if name in ("rolling", "auto"):
        return RollingPolicy(profile, blocks=blocks)
    raise ValueError(f"unknown cache policy {name!r}; choose auto, append or rolling")


def variant_plans(policy: AppendPolicy | RollingPolicy) -> list[BlockPlan]:
    """One plan per distinct static variant, in stream order (the first block that uses it): what a
    backend prepares (graphs, engines) and an exporter exports. Finite for an endless rolling stream:
    its variants stop changing once the sink and the ring are full and the audio history is at its bound."""
    if isinstance(policy, RollingPolicy):
        # kv length is steady from block sink+window-1 on, the audio length from block window-1 on: the
        # work here is bounded whatever the stream's length (a billion blocks start as fast as three)
        limit = policy.sink + policy.window + 1
        limit = limit if policy.blocks is None else min(limit, policy.blocks)
    else:
        limit = policy.blocks  # append: at most the released clip
    seen: dict[tuple[int, int], BlockPlan] = {}
    for _, plan in zip(range(limit), policy.plans()):
        seen.setdefault(plan.variant, plan)
    return list(seen.values())
