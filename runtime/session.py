"""One streaming session, the one block loop of the product: ``StreamSession(components, profile,
dit=DiTOptions(...), decoders=DecoderOptions(...), blocks=N)`` allocates everything once; ``encode(prompt)``
gives the text context; ``run(ctx, seed)`` yields ``DecodedBlock``s (uint8 frames [N, H, W, 3] and 16 kHz
audio) in order as they finish, and may be called again for a new stream. The DiT runs on the calling
thread (``BlockStream`` with the backend's step); each block's committed latents go to the
``DecodePipeline`` right after its denoising steps, so the decoders work while the DiT refreshes the caches
and runs the next block. The initial noise of every block comes from a generator seeded ``seed`` (block by
block, video then audio), the re-noising draws from ``seed + 1``, both on the DiT device: one seed gives
one stream on every backend. ``switch_prompt`` (any thread) takes effect at a block boundary by recomputing
the text K/V in place; ``request_stop`` ends the stream after the block running now. ``stream``, ``bench``
and ``serve`` all run this loop."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch

from hallolive_rt.cache_policy import ENDLESS, choose_policy, parse_blocks, variant_plans
from hallolive_rt.errors import InputError
from hallolive_rt.model.text import encode_prompt, release_text_encoder
from hallolive_rt.model.text_tokenizer import PromptError
from hallolive_rt.nvtx import stage
from hallolive_rt.options import DecoderOptions, DiTOptions
from hallolive_rt.profile import Profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream, window_noise

from .backends import Backend, get_backend
from .backends.auto import BackendChoice, pick_backend
from .block_marks import BlockMarks
from .decode_pipeline import DecodedBlock, DecodePipeline
from .levers import apply_dit_options, check_dit_options, dit_options_info

__all__ = ["StreamSession", "DecodedBlock", "BlockNoise", "PromptSwitch", "parse_prompt_at"]

class BlockNoise:
    """Initial noise of block j (video [B, Fb, C, h, w], audio [B, 30, Ca]) drawn in block order from one
    seeded generator, kept while a window may still ask for it (future audio tokens read ahead)."""

    def __init__(self, profile: Profile, seed: int, device, dtype):
        s, v = profile.stream, profile.video
        self.vshape = (s.batch, s.latent_frames_per_block, v.latent_channels, v.latent_height, v.latent_width)
        self.ashape = (s.batch, s.audio_tokens_per_block, profile.audio.latent_channels)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = device, dtype
        self._blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._next = 0

    def _get(self, j: int):
        while self._next <= j:
            r = lambda shape: torch.randn(shape, generator=self.gen, device=self.device).to(self.dtype)  # noqa: E731
            self._blocks[self._next] = (r(self.vshape), r(self.ashape))
            self._next += 1
        return self._blocks[j]

    def video(self, j: int) -> torch.Tensor:
        return self._get(j)[0]

    def audio(self, j: int) -> torch.Tensor:
        return self._get(j)[1]

    def drop_before(self, j: int) -> None:
        for k in [k for k in self._blocks if k < j]:
            del self._blocks[k]


class PromptSwitch:
    """A prompt change waiting for a block boundary; ``block`` is the first block that uses it once applied."""

    def __init__(self, prompt, at_block: int | None, on_applied: Callable[[int], None] | None):
        self.prompt, self.at_block, self.on_applied = prompt, at_block, on_applied
        self.block: int | None = None  # set once applied


def parse_prompt_at(spec: str) -> tuple[int, str]:
    """``"3:B"`` -> (3, "B"): the prompt that takes over from block 3 (``--prompt-at``)."""
    head, sep, prompt = spec.partition(":")
    if not sep or not head.strip().isdigit():
        raise InputError(f"--prompt-at {spec!r}: expected BLOCK:PROMPT with a block number, e.g. 3:\"A man ...\"")
    return int(head), prompt


class StreamSession:
    """Everything one stream needs, allocated once; ``run`` may be called again for a new stream."""

    def __init__(self, components, profile: Profile | None = None, *, dit: DiTOptions | None = None,
                 decoders: DecoderOptions | None = None, backend: Backend | None = None,
                 blocks: int | str | None = None, future_audio_tokens: int | None = None,
                 on_block: Callable[[DecodedBlock], None] | None = None, on_frames: Callable | None = None,
                 keep_text_encoder: bool = False,
                 backend_choice: BackendChoice | None = None):
        c = components
        p = profile or c.profile
        if future_audio_tokens is not None:
            p = p.with_overrides(future_audio_tokens=future_audio_tokens)
        self.c, self.p = c, p
        dit = dit or DiTOptions()
        self.decoders = decoders or DecoderOptions()
        if backend is None:  # the named one (``auto``: chosen by evidence for the DiT's device)
            if dit.backend == "auto":
                backend_choice = backend_choice or pick_backend(c.dit_device)
            backend = get_backend(backend_choice.name if dit.backend == "auto" else dit.backend)
        self.backend, self.backend_choice = backend, backend_choice
        self.dit_options = dit = replace(dit, backend=backend.name, kv_impl=dit.kv_for(c.dit_device.type))
        # blocks: None = the profile's released clip, ENDLESS ("endless") = until the caller stops reading;
        # self.blocks is then None. The profile keeps its released geometry: the policy is chosen on it.
        self.blocks = parse_blocks(blocks if blocks is not None else p.stream.blocks)
        c.dit.set_kv_impl(dit.kv_impl)
        self.policy = choose_policy(p, self.blocks, dit.cache_policy)
        self.bs = BlockStream(c.dit, p, blocks=self.blocks, policy=self.policy, device=c.dit_device, dtype=c.dtype)
        self.variant_plans = variant_plans(self.policy)
        check_dit_options(dit, backend.name, c.dit_device, c.dtype, c.cfg)
        apply_dit_options(c.dit, self.bs, dit)  # before prepare: graphs capture the chosen forward
        t = time.perf_counter()
        with torch.no_grad():
            self.backend.prepare(self.bs, self.variant_plans)  # may run the DiT: start() zeroes the caches
        self.prepare_s = time.perf_counter() - t
        self._backend_step = self.backend.step
        self.bs.step_fn = self._step
        # on_frames: each latent frame's pixels as soon as they are on the host (FramesReady), before its block
        self.pipeline = DecodePipeline(c, p, overlap=self.decoders.overlap, on_block=on_block, on_frames=on_frames,
                                       video_runner=self.decoders.runner)
        self.text_encode_s: float | None = None
        # keep_text_encoder: encode() keeps the encoder (a live session may still switch prompts by text)
        self.keep_text_encoder = keep_text_encoder
        self._switch_lock = threading.Lock()
        self._pending: list[PromptSwitch] = []
        self.switch_blocks: list[int] = []  # where the switches of the current / last run took effect
        self._stop = threading.Event()
        self._in_session = False
        self._marks: BlockMarks | None = None  # the block whose DiT runs now (``_step`` adds to it)

    # ---- text ---------------------------------------------------------------------------------------
    def encode(self, prompt: str, *, release: bool | None = None):
        """prompt -> (ctx [1, text_len, text_dim] on the DiT device, TokenizedPrompts); frees the encoder
        unless ``release=False`` or ``keep_text_encoder``."""
        release = not self.keep_text_encoder if release is None else release
        enc = self.c.text_encoder
        if enc is None:
            raise RuntimeError("the text encoder was released after the previous prompt (or never built); "
                               "load the components again to encode another prompt")
        dev = next(enc.parameters()).device
        with stage("text/encode"):
            t = time.perf_counter()
            ctx, info = encode_prompt(enc, self.c.tokenizer, prompt, device=dev, dtype=self.c.dtype)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.text_encode_s = time.perf_counter() - t
        if release:
            release_text_encoder(enc)
            self.c.text_encoder = None
        return ctx.to(self.c.dit_device), info

    def switch_prompt(self, prompt: str | torch.Tensor, *, at_block: int | None = None,
                      on_applied: Callable[[int], None] | None = None) -> PromptSwitch:
        """Use ``prompt`` (text, or a context from ``encode``) from block ``at_block`` on (None: the next
        block whose DiT has not started); thread-safe. ``on_applied(block)`` runs on the DiT thread once the
        new text K/V are in place; switches not reached by the end of a run are dropped with it."""
        if at_block is not None and at_block < 0:
            raise ValueError(f"at_block must be >= 0, got {at_block}")
        if isinstance(prompt, str):
            if self.c.text_encoder is None:
                raise RuntimeError("switching to a text prompt needs the text encoder, released after encoding: "
                                   "build the session with keep_text_encoder=True, or pass an encoded context")
            info = self.c.tokenizer(prompt)  # PromptError for an empty prompt
            if info.truncated:
                raise PromptError("prompt too long: " + "; ".join(info.truncation_messages()))
        sw = PromptSwitch(prompt, at_block, on_applied)
        with self._switch_lock:
            self._pending.append(sw)
        return sw

    def request_stop(self) -> None:
        """End the last ``run``'s stream before its next block (thread-safe); blocks already run still come."""
        self._stop.set()

    def _apply_switches(self, block: int) -> None:
        """On the DiT thread, between blocks: the due switches in the order they were asked for."""
        with self._switch_lock:
            due = [sw for sw in self._pending if sw.at_block is None or sw.at_block <= block]
            self._pending = [sw for sw in self._pending if sw not in due]
        for sw in due:
            ctx = self.encode(sw.prompt, release=False)[0] if isinstance(sw.prompt, str) else sw.prompt
            self.c.dit.prepare_text(ctx.to(self.bs.device), self.bs.state)  # in place: captured graphs see it
            sw.block = block
            self.switch_blocks.append(block)
            if sw.on_applied is not None:
                sw.on_applied(block)

    def clear(self) -> None:
        """Zero every per-stream state (caches, text K/V, decoder states): nothing of the last stream stays."""
        with self._on_dit_device():
            self.bs.state.reset()
        self.pipeline.reset_states()

    # ---- the DiT step with ranges and timing marks ----------------------------------------------------
    def _step(self, xv, xa, vt, at, plan):
        marks = self._marks
        context = len(marks.steps) == self.bs.schedule.steps
        name, st = ("dit/context", None) if context else ("dit/step", len(marks.steps))
        a = self.pipeline.clock.mark()
        with stage(name, block=plan.index, step=st):
            out = self._backend_step(xv, xa, vt, at, plan)
        marks.add_forward(a, self.pipeline.clock.mark(), context=context)
        return out

    # ---- streaming ------------------------------------------------------------------------------------
    def run(self, ctx: torch.Tensor, seed: int = 0, *, decode: bool = True,
            on_latents: Callable[[int, object], None] | None = None) -> Iterator[DecodedBlock]:
        """Stream every block for the encoded prompt ``ctx``; yields DecodedBlocks in order as they finish.
        Block times count from the first ``next`` (text K/V preparation included, prompt encoding not).
        ``decode=False`` runs the DiT alone (DiT times, no frames); ``on_latents(index, BlockOutput)`` sees
        each block's committed latents on the DiT thread."""
        self._stop.clear()  # a stop asked for before this call (outside any run) does not end this one
        return self._iterate(ctx, seed, decode, on_latents)

    def _iterate(self, ctx, seed, decode, on_latents):
        if self._in_session:
            yield from self._run(ctx, seed, decode, on_latents)
        else:
            with stage("session"):
                yield from self._run(ctx, seed, decode, on_latents)

    def stream(self, prompt: str, seed: int = 0) -> Iterator[DecodedBlock]:
        """encode + run inside one ``session`` range."""
        with stage("session"):
            self._in_session = True
            try:
                ctx, _ = self.encode(prompt)
                yield from self.run(ctx, seed)
            finally:
                self._in_session = False

    def _run(self, ctx, seed, decode=True, on_latents=None):
        c, p, bs, pipe = self.c, self.p, self.bs, self.pipeline
        init = BlockNoise(p, seed, c.dit_device, c.dtype)
        fresh = TorchNoise(seed + 1, device=c.dit_device)
        pipe.start()
        self.switch_blocks = []
        try:
            with self._on_dit_device(), pipe.dit_stream():
                bs.start(ctx)
            for plan in self.policy.plans():  # lazily: an endless stream has no last plan
                if self._stop.is_set():
                    break
                i = plan.index
                # device / grad state is set per block, never across a yield (it would leak into the caller)
                with stage("block", block=i), self._on_dit_device(), pipe.dit_stream(), torch.no_grad():
                    self._apply_switches(i)
                    win = window_noise(init.audio, i, self.blocks, p.stream.audio_tokens_per_block, p.audio_window)
                    marks = self._marks = BlockMarks(dit_start=pipe.clock.mark())  # _step adds each forward
                    out = bs.denoise_block(plan, init.video(i), win, fresh)
                    marks.denoised = pipe.clock.mark()
                    # the decoders start on the committed latents now, while the DiT runs the context pass
                    # (it only refreshes the caches for block i + 1): the first frame does not wait for it
                    job = pipe.submit(out, marks, sealed=False) if decode else None
                    if on_latents is not None:
                        on_latents(i, out)
                    marks.refresh_start = pipe.clock.mark()
                    bs.refresh_caches(out)
                    marks.dit_end = pipe.clock.mark()
                    if job is not None:
                        pipe.seal(job)
                    init.drop_before(i + 1)
                if not decode:
                    yield self._dit_only(i, marks)
                    continue
                yield from pipe.ready()
            yield from pipe.finish()
        finally:
            pipe.close()
            with self._switch_lock:
                self._pending = []

    def _dit_only(self, i: int, marks: BlockMarks) -> DecodedBlock:
        """A block of the DiT stage alone: its DiT times, its frame count, no media (waits for its end)."""
        clock, dev = self.pipeline.clock, self.c.dit_device
        times = marks.times(clock)
        end = clock.at_s(marks.dit_end, dev)
        n = self.p.pixel_frames(self.p.stream.latent_frames_per_block, first_block=i == 0)
        return DecodedBlock(i, np.zeros((n, 0, 0, 3), np.uint8), np.zeros(0, np.float32), times,
                            clock.at_s(marks.dit_start, dev), end, end, [end])

    def _on_dit_device(self):
        dev = self.c.dit_device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    def describe(self) -> dict:
        d = {"backend": self.backend.name, "variants": self.backend.variants(), "policy": self.policy.name,
             "blocks": ENDLESS if self.blocks is None else self.blocks, "state_bytes": self.bs.state.nbytes(),
             "prepare_s": self.prepare_s, "kv_impl": self.c.dit.kv.name,
             **dit_options_info(self.c.dit, self.bs, self.backend), "video_decoder": self.decoders.video_decoder,
             **self.pipeline.describe(), "prompt_switches": list(self.switch_blocks)}
        if self.backend_choice is not None:
            d["backend_choice"] = self.backend_choice.describe()
        return d
