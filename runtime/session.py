"""One streaming session: prompt -> text context -> blocks of decoded frames + audio, on any backend.

    comps = load_components(profile, model_dir, dit_device="cuda:0", vae_device="cuda:1")
    sess = StreamSession(comps, profile, backend="cudagraph", blocks=5)
    ctx, info = sess.encode("A woman speaks ...")        # text/encode; frees the encoder afterwards
    for blk in sess.run(ctx, seed=0):                    # DecodedBlock, in order, as they finish
        blk.frames  # uint8 [N, H, W, 3]; N = 1 + 4(Fb-1) for block 0, 4 Fb after
        blk.audio   # float32 [tokens_per_block * 512] at 16 kHz (streamed decode)

The DiT runs on the main thread (``BlockStream``, the one block loop, with the backend's step); each
finished block is handed to ``DecodePipeline`` (runtime/devices.py), which decodes it on the VAE device
while the DiT runs the next block. Seeds: the initial noise of every block comes from a generator
seeded ``seed`` (block by block, video then audio), the fresh re-noising draws from ``seed + 1``, both
on the DiT device: the same seed gives the same stream on every backend.

NVTX (hallolive_rt.nvtx): session > text/encode, block > dit/step (x steps), dit/context, and
vae/video, vae/audio, io/write (on the decode and writer threads when overlapped).

Opt-in fast paths of the DiT forward (``fuse_projections``, ``attn_kernel``; off / ``auto`` by default,
unmeasured until a GPU run commits numbers) are set on the DiT by the session and reported by
``describe()``; ``check_fast_paths`` validates them before anything is loaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hallolive_rt.cache_policy import ENDLESS, choose_policy, parse_blocks, variant_plans
from hallolive_rt.config import FusionConfig
from hallolive_rt.model.attention import check_attention_kernel
from hallolive_rt.model.text import encode_prompt, release_text_encoder
from hallolive_rt.nvtx import stage
from hallolive_rt.profile import Profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import BlockStream, window_noise

from .backends import Backend, get_backend
from .devices import DecodedBlock, DecodePipeline

__all__ = ["StreamSession", "DecodedBlock", "BlockNoise", "InputError", "stream_main", "check_fast_paths",
           "PYTORCH_FORWARD_BACKENDS"]

PYTORCH_FORWARD_BACKENDS = ("eager", "cudagraph")  # backends that run DualStreamDiT.forward itself


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


class StreamSession:
    """Everything one stream needs, allocated once; ``run`` may be called again for a new stream."""

    def __init__(self, components, profile: Profile | None = None, *, backend: str | Backend = "eager",
                 blocks: int | str | None = None, future_audio_tokens: int | None = None, cache_policy: str = "auto",
                 kv_impl: str = "torch", dit_device=None, vae_device=None, overlap: bool = True,
                 on_block: Callable[[DecodedBlock], None] | None = None, backend_options: dict | None = None,
                 fuse_projections: bool = False, attn_kernel: str = "auto", video_runner=None):
        c = components
        p = profile or c.profile
        if future_audio_tokens is not None:
            p = p.with_overrides(future_audio_tokens=future_audio_tokens)
        for flag, want, have in (("dit_device", dit_device, c.dit_device), ("vae_device", vae_device, c.vae_device)):
            if want is not None and torch.device(want) != have:
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
        if fuse_projections:
            c.dit.fuse_projections()
        else:
            c.dit.unfuse_projections()
        c.dit.set_attention_kernel(attn_kernel)  # before prepare: graphs capture the chosen forward
        t = time.perf_counter()
        with torch.no_grad():
            self.backend.prepare(self.bs, self.variant_plans)  # may run the DiT: start() zeroes the caches
        self.prepare_s = time.perf_counter() - t
        self._backend_step = self.backend.step
        self.bs.step_fn = self._step
        # video_runner: VideoDecodeOptions or "eager" | "cudagraph+cl3d" ... (runtime/vae_runner.py)
        self.pipeline = DecodePipeline(c, p, overlap=overlap, on_block=on_block, video_runner=video_runner)
        self.text_encode_s: float | None = None
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
    def encode(self, prompt: str, *, release: bool = True):
        """prompt -> (ctx [1, text_len, text_dim] on the DiT device, TokenizedPrompts). Frees the encoder."""
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

        Time zero of the block times (``start_s``, ``first_frame_s``, ``done_s``) is this call: TTFF is
        ``first block's first_frame_s``, text K/V preparation included, prompt encoding excluded.
        """
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
        try:
            with self._on_dit_device(), pipe.dit_stream():
                bs.start(ctx)
            for plan in self.policy.plans():  # lazily: an endless stream has no last plan
                i = plan.index
                # device / grad state is set per block, never across a yield (it would leak into the caller)
                with stage("block", block=i), self._on_dit_device(), pipe.dit_stream(), torch.no_grad():
                    win = window_noise(init.audio, i, self.blocks, p.stream.audio_tokens_per_block, p.audio_window)
                    self._k, self._marks = 0, {"steps": []}
                    self._marks["dit_start"] = pipe.clock.mark()
                    out = bs.run_block(plan, init.video(i), win, fresh)
                    self._marks["dit_end"] = pipe.clock.mark()
                    init.drop_before(i + 1)
                    pipe.submit(out, self._marks)
                yield from pipe.ready()
            yield from pipe.finish()
        finally:
            pipe.close()

    def _on_dit_device(self):
        dev = self.c.dit_device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    def describe(self) -> dict:
        return {"backend": self.backend.name, "variants": self.backend.variants(), "policy": self.policy.name,
                "blocks": ENDLESS if self.blocks is None else self.blocks, "state_bytes": self.bs.state.nbytes(),
                "prepare_s": self.prepare_s, "kv_impl": self.c.dit.kv.name,
                "fuse_projections": self.c.dit.projections_fused, "attn_kernel": self.c.dit.attn_kernel,
                **self.pipeline.describe()}


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
                vae_backend: str = "eager", vae_channels_last: bool = False, console=None, ema: bool = False) -> dict:
    """Validate every input, then stream ``prompt`` to ``out`` (fragmented MP4) / ``frames_out`` (.y4m) /
    ``wav_out``, with a per-block progress display and an optional ``metrics`` JSON. Returns a summary.

    Validation happens before any file is opened or any weight is loaded where possible (preset, block
    count, dtype, devices, backend, fast paths, model files, prompt, output paths); a failure raises ``InputError``
    (exit code 2) with a message that says what to change. ``future_audio_frames``: audio lookahead in
    audio latent frames (= tokens: one audio "frame" of the release is one token). Defaults: tiny preset
    with random weights (no files needed); the full preset needs ``model_dir`` or ``random_weights``.
    ``ema``: load the DiT's ``generator_ema`` entry of a nested training file (``load_dit``).
    """
    from rich.console import Console

    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.kvcache.build import require_kv_ext
    from hallolive_rt.model.text_tokenizer import PromptError, load_tokenizer, require_text_extra
    from hallolive_rt.profile import ProfileError, load_profile
    from hallolive_rt.runtime.media import MediaError, StreamWriter
    from hallolive_rt.weights import CheckpointError

    from .backends import BackendUnavailable
    from .components import MODEL_FILES, MissingModelFiles, check_model_dir, load_components
    from .devices import resolve_devices
    from .metrics import stream_metrics, write_json
    from .vae_runner import check_vae_options, parse_vae_variant

    console = console or Console(stderr=True)
    try:
        # the profile keeps its released clip length: the block count goes to the session, whose cache
        # policy depends on it (append up to the clip, rolling past it and for endless streams)
        prof = load_profile(preset).with_overrides(future_audio_tokens=future_audio_frames, dtype=dtype)
        nblocks = parse_blocks(blocks if blocks is not None else prof.stream.blocks)  # None = endless
        choose_policy(prof, nblocks, cache_policy)  # refuses e.g. append past the clip, before any load
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
        be = get_backend(backend)
        check_fast_paths(be.name, fuse_projections, attn_kernel, dit_dev, prof.dtype,
                         load_fusion_config(prof.video_config, prof.audio_config))
        vae_opts = parse_vae_variant(vae_backend, vae_channels_last)
        check_vae_options(vae_opts, vae_dev)
        require_kv_ext(kv_impl, dit_dev)  # builds/loads the extension now, not after the weights
    except (ValueError, MissingModelFiles, BackendUnavailable) as e:
        raise InputError(str(e)) from e
    # the prompt, with the tokenizer the weights will use (cheap; before any weight is loaded)
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

    try:
        comps = load_components(prof, paths and Path(model_dir), dit_device=dit_dev, vae_device=vae_dev,
                                dtype=prof.dtype, seed=seed, ema=ema)
    except CheckpointError as e:
        raise InputError(f"{e}\n(expected the official files: {MODEL_FILES})") from e
    sess = StreamSession(comps, prof, backend=be, blocks=ENDLESS if nblocks is None else nblocks,
                         cache_policy=cache_policy, kv_impl=kv_impl,
                         overlap=overlap, fuse_projections=fuse_projections, attn_kernel=attn_kernel,
                         video_runner=vae_opts)
    ctx, _ = sess.encode(prompt)
    for _ in range(warmup_runs):  # graph/kernel warm-up streams, not timed, not written, no ranges
        from hallolive_rt.nvtx import suppressed

        with suppressed():
            for _blk in sess.run(ctx, seed):
                pass
    sess.pipeline.on_block = lambda b: writer.write_block(b.frames, b.audio)  # on the writer thread
    got: list[DecodedBlock] = []  # times and counts only: an endless stream must not keep its frames
    with writer, _Progress(console, nblocks, progress) as bar:
        for blk in sess.run(ctx, seed):
            got.append(blk.without_media())
            bar.update(blk)
    summary = {"out": out, "frames_out": frames_out, "wav_out": wav_out, "writer": writer.summary,
               "blocks": len(got), "frames": sum(b.frames.shape[0] for b in got),
               "audio_samples": sum(b.audio.shape[0] for b in got), "session": sess.describe()}
    if metrics is not None:
        m = stream_metrics(got, fps=float(fps), text_encode_s=sess.text_encode_s, device=str(dit_dev),
                           dtype=prof.dtype_name,
                           extra={"command": "hallolive-rt stream", "preset": prof.name, "seed": seed,
                                  "weights": comps.source, "vae_device": str(vae_dev), "session": sess.describe(),
                                  "writer": writer.summary})
        write_json(m, metrics)
        summary["metrics"] = m
    return summary


def _check_parent_writable(p: Path, what: str) -> None:
    import os

    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{what} path {str(p)!r} is a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} path {str(p)!r}: folder {str(parent)!r} does not exist or is not writable")


class _Progress:
    """rich progress bar per block on a terminal; one plain line per block otherwise."""

    def __init__(self, console, total: int | None, enabled: bool):  # total None: an endless stream
        self.console, self.total, self.enabled = console, total, enabled
        self.bar = None

    def __enter__(self):
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("streaming"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}"), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task("stream", total=self.total, info="")
        return self

    def update(self, b: DecodedBlock) -> None:
        info = (f"block {b.index}: {b.frames.shape[0]} frames, dit {b.times['dit']:.0f} ms, "
                f"vae {b.times['vae_video'] + b.times['vae_audio']:.0f} ms, first frame at {b.first_frame_s:.2f} s")
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        elif self.enabled:
            of = "" if self.total is None else f"/{self.total}"
            self.console.print(f"[{b.index + 1}{of}] {info}", highlight=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
