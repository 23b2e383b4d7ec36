"""One streaming session: prompt -> text context -> blocks of decoded frames + audio, on any backend.

    comps = load_components(profile, model_dir, dit_device="cuda:0", vae_device="cuda:1")
    sess = StreamSession(comps, profile, backend="cudagraph", blocks=5)
    ctx, info = sess.encode("A woman speaks ...")        # text/encode; frees the encoder afterwards
    for blk in sess.run(ctx, seed=0):                    # DecodedBlock, in order, as they finish
        blk.frames  # uint8 [N, H, W, 3]; N = 1 + 4(Fb-1) for block 0, 4 Fb after
        blk.audio   # float32 [tokens_per_block * 512] at 16 kHz (streamed decode)

The DiT runs on the main thread (``BlockStream``, the one block loop, with the backend's step); each
finished block is handed to ``DecodePipeline`` (runtime/decode_pipeline.py), which decodes it on the VAE device
while the DiT runs the next block. Seeds: the initial noise of every block comes from a generator
seeded ``seed`` (block by block, video then audio), the fresh re-noising draws from ``seed + 1``, both
on the DiT device: the same seed gives the same stream on every backend.

NVTX (hallolive_rt.nvtx): session > text/encode, block > dit/step (x steps), dit/context, and
vae/video, vae/audio, io/write (on the decode and writer threads when overlapped).

Opt-in fast paths of the DiT forward (``fuse_projections``, ``attn_kernel``; off / ``auto`` by default,
not yet measured on a GPU) are set on the DiT by the session and reported by
``describe()``; ``check_fast_paths`` validates them before anything is loaded. The speed levers of
issue #15 (``levers=DiTLevers(...)``: fp8 Linears, lean context pass; ``runtime/levers.py``) are applied
the same way, and ``backend="compiled"`` compiles the DiT's layers while capturing.

Prompt switching: ``switch_prompt(prompt_or_ctx, at_block=None)`` (any thread, any time) takes effect at a
block boundary, on the DiT thread before the block's first forward: the text K/V of both streams are
recomputed in place (``prepare_text``), the caches of earlier blocks stay. A string is encoded there, with
the resident text encoder (``keep_text_encoder=True``); an encoded context needs no encoder. ``request_stop``
ends a stream after the block running now (the blocks already generated are still decoded and yielded).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hallolive_rt.cache_policy import ENDLESS, choose_policy, parse_blocks, variant_plans
from hallolive_rt.config import FusionConfig
from hallolive_rt.model.attention import check_attention_kernel
from hallolive_rt.model.text import encode_prompt, release_text_encoder
from hallolive_rt.model.text_tokenizer import PromptError
from hallolive_rt.nvtx import stage
from hallolive_rt.profile import Profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream, window_noise

from .backends import Backend, get_backend
from .decode_pipeline import DecodedBlock, DecodePipeline
from .placement import canonical_device
from .levers import DiTLevers, apply_levers, check_levers, levers_info, precision_dtype

__all__ = ["StreamSession", "DecodedBlock", "BlockNoise", "InputError", "stream_main", "check_fast_paths",
           "PYTORCH_FORWARD_BACKENDS", "PromptSwitch", "parse_prompt_at"]

PYTORCH_FORWARD_BACKENDS = ("eager", "cudagraph", "compiled")  # backends that run DualStreamDiT.forward itself


def check_fast_paths(backend: str, fuse_projections: bool, attn_kernel: str, device, dtype: torch.dtype,
                     cfg: FusionConfig) -> None:
    """Raise ``ValueError`` unless the opt-in fast paths can apply: ``attn_kernel`` runs on ``device`` in
    ``dtype`` at the DiT's head dims, and a non-default choice goes with a backend that runs the PyTorch
    forward (an aoti / tensorrt artifact has its kernels compiled in: the choice would be a silent no-op)."""
    check_attention_kernel(attn_kernel, device, dtype, (cfg.video.head_dim, cfg.audio.head_dim))
    if backend not in PYTORCH_FORWARD_BACKENDS and (fuse_projections or attn_kernel != "auto"):
        raise ValueError(f"--fuse-projections / --attn-kernel change the PyTorch forward, which the {backend} "
                         f"backend does not run (its artifact was compiled by `hallolive-rt export`): use "
                         f"--backend {' or '.join(PYTORCH_FORWARD_BACKENDS)}, or drop them")


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
        self.block: int | None = None


def parse_prompt_at(spec: str) -> tuple[int, str]:
    """``"3:B"`` -> (3, "B"): the prompt that takes over from block 3 (``--prompt-at``)."""
    head, sep, prompt = spec.partition(":")
    if not sep or not head.strip().isdigit():
        raise ValueError(f"--prompt-at {spec!r}: expected BLOCK:PROMPT with a block number, e.g. 3:\"A man ...\"")
    return int(head), prompt


class StreamSession:
    """Everything one stream needs, allocated once; ``run`` may be called again for a new stream."""

    def __init__(self, components, profile: Profile | None = None, *, backend: str | Backend = "eager",
                 blocks: int | str | None = None, future_audio_tokens: int | None = None, cache_policy: str = "auto",
                 kv_impl: str = "torch", dit_device=None, vae_device=None, overlap: bool = True,
                 on_block: Callable[[DecodedBlock], None] | None = None, backend_options: dict | None = None,
                 fuse_projections: bool = False, attn_kernel: str = "auto", video_runner=None,
                 levers: DiTLevers | None = None, keep_text_encoder: bool = False):
        c = components
        p = profile or c.profile
        if future_audio_tokens is not None:
            p = p.with_overrides(future_audio_tokens=future_audio_tokens)
        for flag, want, have in (("dit_device", dit_device, c.dit_device), ("vae_device", vae_device, c.vae_device)):
            if want is not None and canonical_device(want) != have:
                raise ValueError(f"{flag}={want} but the components were built on {have}; build them there")
        self.c, self.p = c, p
        # blocks: None = the profile's released clip, ENDLESS ("endless") = until the caller stops reading;
        # self.blocks is then None. The profile keeps its released geometry: the policy is chosen on it.
        self.blocks = parse_blocks(blocks if blocks is not None else p.stream.blocks)
        c.dit.set_kv_impl(kv_impl)
        self.policy = choose_policy(p, self.blocks, cache_policy)
        self.bs = BlockStream(c.dit, p, blocks=self.blocks, policy=self.policy, device=c.dit_device, dtype=c.dtype)
        self.variant_plans = variant_plans(self.policy)
        self.backend = get_backend(backend, **(backend_options or {})) if isinstance(backend, str) else backend
        check_fast_paths(self.backend.name, fuse_projections, attn_kernel, c.dit_device, c.dtype, c.cfg)
        self.levers = levers or DiTLevers()
        check_levers(self.backend.name, self.levers, c.dtype)
        if fuse_projections:
            c.dit.fuse_projections()
        else:
            c.dit.unfuse_projections()
        c.dit.set_attention_kernel(attn_kernel)  # before prepare: graphs capture the chosen forward
        apply_levers(c.dit, self.bs, self.levers)  # fp8 after fusing; lean context pass
        t = time.perf_counter()
        with torch.no_grad():
            self.backend.prepare(self.bs, self.variant_plans)  # may run the DiT: start() zeroes the caches
        self.prepare_s = time.perf_counter() - t
        self._backend_step = self.backend.step
        self.bs.step_fn = self._step
        # video_runner: VideoDecodeOptions or "eager" | "cudagraph+cl3d" ... (runtime/vae_runner.py)
        self.pipeline = DecodePipeline(c, p, overlap=overlap, on_block=on_block, video_runner=video_runner)
        self.text_encode_s: float | None = None
        # keep_text_encoder: encode() keeps the encoder (a live session may still switch prompts by text)
        self.keep_text_encoder = keep_text_encoder
        self._switch_lock = threading.Lock()
        self._pending: list[PromptSwitch] = []
        self.switch_blocks: list[int] = []  # where the switches of the current / last run took effect
        self._stop = threading.Event()
        self._in_session = False
        self._k = 0
        self._marks: dict = {}

    @property
    def plans(self) -> list:
        """Every block's plan (a finite stream only; an endless one iterates ``policy.plans()``)."""
        if self.blocks is None:
            raise ValueError("an endless stream has no finite list of plans; iterate policy.plans()")
        return list(self.policy.plans())

    # ---- text ---------------------------------------------------------------------------------------
    def encode(self, prompt: str, *, release: bool | None = None):
        """prompt -> (ctx [1, text_len, text_dim] on the DiT device, TokenizedPrompts). Frees the encoder
        afterwards unless ``release=False`` or the session keeps it (``keep_text_encoder``)."""
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
        block whose DiT has not started). Thread-safe; ``on_applied(block)`` runs on the DiT thread once the
        new text K/V are in place. Switches not reached by the end of a run are dropped with it. A text
        prompt is checked here (tokenizer) and needs the resident encoder; raises ``PromptError`` /
        ``RuntimeError`` / ``ValueError`` before anything is queued."""
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
        """End the stream of the last ``run`` call before its next block (thread-safe; the next ``run`` call
        clears it). Blocks already run are still decoded and yielded."""
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
        k, steps = self._k, self.bs.schedule.steps
        self._k += 1
        name, st = ("dit/step", k) if k < steps else ("dit/context", None)
        a = self.pipeline.clock.mark()
        with stage(name, block=plan.index, step=st):
            out = self._backend_step(xv, xa, vt, at, plan)
        b = self.pipeline.clock.mark()
        if k < steps:
            self._marks["steps"].append((a, b))
        else:
            self._marks["context"] = (a, b)
        return out

    # ---- streaming ------------------------------------------------------------------------------------
    def run(self, ctx: torch.Tensor, seed: int = 0) -> Iterator[DecodedBlock]:
        """Stream every block for the encoded prompt ``ctx``; yields DecodedBlocks in order as they finish.

        Time zero of the block times (``start_s``, ``first_frame_s``, ``done_s``) is the start of the
        iteration (first ``next``): TTFF is ``first block's first_frame_s``, text K/V preparation included,
        prompt encoding excluded. A ``request_stop`` from this call on (even before the first block) ends this stream.
        """
        self._stop.clear()  # a stop asked for before this call (outside any run) does not end this one
        return self._iterate(ctx, seed)

    def _iterate(self, ctx, seed):
        if self._in_session:
            yield from self._run(ctx, seed)
        else:
            with stage("session"):
                yield from self._run(ctx, seed)

    def stream(self, prompt: str, seed: int = 0) -> Iterator[DecodedBlock]:
        """encode + run inside one ``session`` range."""
        with stage("session"):
            self._in_session = True
            try:
                ctx, _ = self.encode(prompt)
                yield from self.run(ctx, seed)
            finally:
                self._in_session = False

    def _run(self, ctx, seed):
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
                    self._k = 0
                    marks = self._marks = {"steps": []}  # _step adds each forward's marks
                    marks["dit_start"] = pipe.clock.mark()
                    out = bs.denoise_block(plan, init.video(i), win, fresh)
                    marks["denoised"] = pipe.clock.mark()
                    # the decoders start on the committed latents now, while the DiT runs the context pass
                    # (it only refreshes the caches for block i + 1): the first frame does not wait for it
                    job = pipe.submit(out, marks, sealed=False)
                    marks["refresh_start"] = pipe.clock.mark()
                    bs.refresh_caches(out)
                    marks["dit_end"] = pipe.clock.mark()
                    pipe.seal(job)
                    init.drop_before(i + 1)
                yield from pipe.ready()
            yield from pipe.finish()
        finally:
            pipe.close()
            with self._switch_lock:
                self._pending = []

    def _on_dit_device(self):
        dev = self.c.dit_device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    def describe(self) -> dict:
        return {"backend": self.backend.name, "variants": self.backend.variants(), "policy": self.policy.name,
                "blocks": ENDLESS if self.blocks is None else self.blocks, "state_bytes": self.bs.state.nbytes(),
                "prepare_s": self.prepare_s, "kv_impl": self.c.dit.kv.name,
                "fuse_projections": self.c.dit.projections_fused, "attn_kernel": self.c.dit.attn_kernel,
                **levers_info(self.c.dit, self.bs, self.backend), **self.pipeline.describe(),
                "prompt_switches": list(self.switch_blocks)}


# ---- `hallolive-rt stream`: everything the CLI command does, as one function ----------------------------

class InputError(ValueError):
    """A bad input found before any output was opened (CLI exit code ``exit_code``)."""

    exit_code = 2


def stream_main(prompt: str, *, out: str | None = "hallolive.mp4", preset: str = "tiny",
                model_dir: str | None = None, random_weights: bool = False, blocks: int | str | None = None,
                future_audio_frames: int | None = None, seed: int = 0, metrics: str | None = None,
                device: str = "cpu", vae_device: str | None = None, dtype: str | None = None,
                backend: str = "eager", cache_policy: str = "auto", kv_impl: str = "torch",
                frames_out: str | None = None, wav_out: str | None = None, fps: float | None = None,
                overlap: bool = True, truncate_prompt: bool = False, warmup_runs: int = 0,
                fuse_projections: bool = False, attn_kernel: str = "auto", progress: bool = True,
                vae_backend: str = "eager", vae_channels_last: bool = False, console=None, ema: bool = False,
                levers: DiTLevers | None = None, prompt_at: list[tuple[int, str]] | None = None,
                artifacts: str | None = None, overwrite: bool = False) -> dict:
    """Validate every input, then stream ``prompt`` to ``out`` (fragmented MP4) / ``frames_out`` (.y4m) /
    ``wav_out``, with per-block progress (a bar on a terminal, one line per block otherwise) and an
    optional ``metrics`` JSON. Returns a summary.

    Validation happens before any file is opened or any weight is loaded (preset, block count, lookahead
    range, dtype, devices, backend and its ``artifacts`` directory, fast paths, levers, video decoder
    options, model files, prompts, output paths); a failure raises ``InputError`` (exit code 2) with a
    message that says what to change. Every output is then claimed (``runtime/outputs.claim_outputs``):
    another process writing one is refused with its PID and command, an existing one unless ``overwrite``.
    ``future_audio_frames``: audio lookahead in audio latent frames (= tokens: one audio "frame" of the
    release is one token). ``ema``: load the DiT's ``generator_ema`` entry of a nested training file
    (``load_dit``). ``prompt_at``: [(block, prompt)], each prompt used from that block on
    (``--prompt-at 3:"B"``); every prompt is encoded before the stream starts, then the encoder is freed.

    Ends: a write that fails (disk full) raises ``OutputWriteError`` after cutting the outputs back to
    their last complete block; SIGINT / SIGTERM (``runtime/stopping.py``) end the stream at a block
    boundary and return the summary with ``interrupted`` (the signal's name) and ``exit_code`` (130 / 143).
    Defaults: tiny preset with random weights (no files needed); the full preset needs ``model_dir`` or
    ``random_weights``.
    """
    from rich.console import Console

    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.kvcache.build import require_kv_ext
    from hallolive_rt.model.text_tokenizer import PromptError, load_tokenizer, require_text_extra
    from hallolive_rt.profile import ProfileError, load_profile
    from hallolive_rt.runtime.media import MediaError, StreamWriter

    from .backends import BackendUnavailable
    from .backends.artifacts import backend_for_run
    from .components import MissingModelFiles, check_model_dir
    from .placement import resolve_devices
    from .vae_runner import check_vae_options, parse_vae_variant

    console = console or Console(stderr=True)
    levers = levers or DiTLevers()
    try:
        dtype = precision_dtype(levers.precision, dtype)  # --precision bf16|fp16|fp32 name the --dtype
        # the profile keeps its released clip length: the block count goes to the session, whose cache
        # policy depends on it (append up to the clip, rolling past it and for endless streams); the
        # policy also refuses a lookahead F whose audio positions would leave the RoPE tables
        prof = load_profile(preset).with_overrides(future_audio_tokens=future_audio_frames, dtype=dtype)
        nblocks = parse_blocks(blocks if blocks is not None else prof.stream.blocks)  # None = endless
        policy = choose_policy(prof, nblocks, cache_policy)  # refuses e.g. append past the clip, before any load
    except (ProfileError, ValueError) as e:
        raise InputError(str(e)) from e
    if model_dir is not None and random_weights:
        raise InputError("--model-dir and --random-weights exclude each other: drop one")
    if model_dir is None and not random_weights and prof.decoders != "tiny":
        raise InputError(f"preset {prof.name} needs weights: pass --model-dir <official download> or "
                         f"--random-weights (the architecture with random weights, for benchmarks)")
    if model_dir is not None and prof.decoders == "tiny":
        raise InputError("the tiny preset has no released weights; drop --model-dir (it runs with random "
                         "weights) or choose --preset hallolive-512x992")
    try:
        dit_dev, vae_dev = resolve_devices(device, vae_device)
        if model_dir is not None:
            require_text_extra()  # the release's tokenizer: said before the model files are looked at
        paths = check_model_dir(model_dir) if model_dir is not None else None
        be = backend_for_run(backend, artifacts, model_dir=model_dir, seed=seed, ema=ema)
        check_fast_paths(be.name, fuse_projections, attn_kernel, dit_dev, prof.dtype,
                         load_fusion_config(prof.video_config, prof.audio_config))
        check_levers(be.name, levers, prof.dtype)
        vae_opts = parse_vae_variant(vae_backend, vae_channels_last)
        check_vae_options(vae_opts, vae_dev)
        require_kv_ext(kv_impl, dit_dev)  # builds/loads the extension now, not after the weights
    except (ValueError, MissingModelFiles, BackendUnavailable, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    # the prompt, with the tokenizer the weights will use (cheap; before any weight is loaded)
    _check_utf8(prompt)
    try:
        tok = load_tokenizer(paths["tokenizer"] if paths else None, text_len=prof.text.text_len)
        info = tok(prompt)
    except PromptError as e:
        raise InputError(str(e)) from e
    if info.truncated:
        msg = "; ".join(info.truncation_messages())
        if not truncate_prompt:
            raise InputError(f"prompt too long: {msg}. Shorten it or pass --truncate-prompt to accept the cut")
        console.print(f"[yellow]warning:[/] {msg}")
    prompt_at = sorted(prompt_at or [])
    for at, text in prompt_at:
        if at < 1 or (nblocks is not None and at >= nblocks):
            raise InputError(f"--prompt-at {at}:...: the block must be in 1..{'' if nblocks is None else nblocks - 1} "
                             f"(block 0 uses --prompt; blocks are counted from 0)")
        _check_utf8(text, f"the prompt of --prompt-at {at}")
        try:
            sw_info = tok(text)
        except PromptError as e:
            raise InputError(f"--prompt-at {at}: {e}") from e
        if sw_info.truncated and not truncate_prompt:
            raise InputError(f"--prompt-at {at}: prompt too long: {'; '.join(sw_info.truncation_messages())}")
    fps = fps or prof.fps
    try:  # checks every output path now; the files themselves are opened at the first block
        writer = StreamWriter(None if out is None else Path(out), width=prof.pixel_width,
                              height=prof.pixel_height, fps=fps, sample_rate=prof.audio.sample_rate,
                              frames_out=None if frames_out is None else Path(frames_out),
                              wav_out=None if wav_out is None else Path(wav_out))
        if metrics is not None:
            _check_parent_writable(Path(metrics), "metrics")
    except MediaError as e:
        raise InputError(str(e)) from e
    run = dict(prompt=prompt, prof=prof, policy=policy, nblocks=nblocks, be=be, paths=paths, model_dir=model_dir,
               dit_dev=dit_dev, vae_dev=vae_dev, seed=seed, cache_policy=cache_policy, kv_impl=kv_impl,
               overlap=overlap, fuse_projections=fuse_projections, attn_kernel=attn_kernel, warmup_runs=warmup_runs,
               vae_opts=vae_opts, ema=ema, levers=levers, prompt_at=prompt_at, writer=writer, console=console,
               progress=progress, fps=fps, metrics=metrics,
               outputs={"out": out, "frames_out": frames_out, "wav_out": wav_out})
    from .stream_run import claim_and_stream

    return claim_and_stream(run, overwrite)


def _check_utf8(prompt: str, what_prompt: str = "the prompt") -> None:
    """A prompt from a command line holds bytes that are not UTF-8 as lone surrogates (surrogateescape)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            raw = prompt[e.start:e.end].encode("utf-8", "surrogateescape").hex(" ")
            what = f"byte(s) {raw}"
        except UnicodeEncodeError:
            what = f"the lone surrogate {prompt[e.start:e.end]!r}"
        raise InputError(f"{what_prompt} is not valid UTF-8: {what} at character {e.start} (after "
                         f"{prompt[:e.start][-20:]!r}); pass the text in UTF-8") from None


def _check_parent_writable(p: Path, what: str) -> None:
    import os

    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{what} path {str(p)!r} is a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} path {str(p)!r}: folder {str(parent)!r} does not exist or is not writable")
