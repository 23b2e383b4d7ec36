"""``hallolive-rt stream`` as one function: ``stream_main(prompt, model=..., dit=..., decoders=...,
outputs=...)`` checks every input (run options, prompts, output paths) before any weight is loaded, claims
the outputs, and streams the session's blocks into the writer with progress per block; a first SIGINT /
SIGTERM ends the stream at a block boundary (``interrupted`` and ``exit_code`` 130 / 143 in the summary)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from hallolive_rt.cache_policy import ENDLESS
from hallolive_rt.errors import CheckpointError, InputError, MediaError, OutputClaimError, OutputWriteError
from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource, OutputOptions

from .decode_pipeline import DecodedBlock
from .outputs import check_writable
from .progress import StreamProgress
from .resolve import ResolvedRun, resolve_run
from .session import StreamSession

__all__ = ["stream_main", "check_utf8"]


@dataclass
class _Job:
    """A checked stream, ready to run."""

    run: ResolvedRun
    prompt: str
    prompt_at: list[tuple[int, str]]
    outputs: OutputOptions
    writer: object
    console: object
    progress: bool
    fps: float
    warmup_runs: int


def stream_main(prompt: str, *, model: ModelSource | None = None, dit: DiTOptions | None = None,
                decoders: DecoderOptions | None = None, outputs: OutputOptions | None = None,
                blocks: int | str | None = None, future_audio_frames: int | None = None,
                prompt_at: list[tuple[int, str]] | None = None, truncate_prompt: bool = False, warmup_runs: int = 0,
                progress: bool = True, console=None, fps: float | None = None) -> dict:
    """Check, then stream ``prompt``; returns a summary. ``prompt_at``: [(block, prompt)], each used from that
    block on (all encoded before the stream starts). Defaults: the tiny preset with random weights."""
    from rich.console import Console

    from hallolive_rt.model.text_tokenizer import PromptError, load_tokenizer

    from .media import StreamWriter

    console = console or Console(stderr=True)
    outputs = outputs or OutputOptions()
    run = resolve_run(model or ModelSource(), dit or DiTOptions(), decoders or DecoderOptions(), blocks=blocks,
                      future_audio_frames=future_audio_frames)
    prof, nblocks = run.profile, run.nblocks
    # the prompts, with the tokenizer the weights will use (cheap; before any weight is loaded)
    tok = load_tokenizer(run.paths["tokenizer"] if run.paths else None, text_len=prof.text.text_len)
    prompt_at = sorted(prompt_at or [])
    for at, text in [(None, prompt), *prompt_at]:
        what = "the prompt" if at is None else f"the prompt of --prompt-at {at}"
        if at is not None and (at < 1 or (nblocks is not None and at >= nblocks)):
            raise InputError(f"--prompt-at {at}:...: the block must be in 1..{'' if nblocks is None else nblocks - 1} "
                             f"(block 0 uses --prompt; blocks are counted from 0)")
        check_utf8(text, what)
        try:
            info = tok(text)
        except PromptError as e:
            raise InputError(str(e) if at is None else f"--prompt-at {at}: {e}") from e
        if info.truncated:
            msg = "; ".join(info.truncation_messages())
            if not truncate_prompt:
                raise InputError(f"{what} is too long: {msg}. Shorten it or pass --truncate-prompt to accept the cut")
            console.print(f"[yellow]warning:[/] {msg}")
    fps = fps or prof.fps
    try:  # checks every output path now; the files themselves are opened at the first block
        writer = StreamWriter(outputs.out, width=prof.pixel_width, height=prof.pixel_height, fps=fps,
                              sample_rate=prof.audio.sample_rate, frames_out=outputs.frames_out,
                              wav_out=outputs.wav_out)
        if outputs.metrics is not None:
            check_writable(outputs.metrics, "metrics")
    except MediaError as e:
        raise InputError(str(e)) from e
    job = _Job(run, prompt, prompt_at, outputs, writer, console, progress, fps, warmup_runs)
    return _claim_and_stream(job)


def _claim_and_stream(job: _Job) -> dict:
    """Claim the outputs (lock, no silent overwrite), then stream under SIGINT / SIGTERM handling."""
    from .outputs import claim_outputs
    from .stopping import StopSignals, StreamInterrupted, exit_code

    o = job.outputs
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopSignals())  # first: a signal while claiming still releases the claims
        try:
            try:
                stack.enter_context(claim_outputs(o.named(), overwrite=o.overwrite))
            except OutputClaimError as e:
                raise InputError(str(e)) from None
            return _stream(job, stop)
        except StreamInterrupted as e:  # before the stream started, or a second signal: ends now
            summary = {**_paths(o), "writer": job.writer.summary, "blocks": job.writer.summary.get("blocks", 0)}
            return {**summary, "interrupted": e.name, "exit_code": exit_code(e.signum)}


def _paths(o: OutputOptions) -> dict:
    return {"out": o.out, "frames_out": o.frames_out, "wav_out": o.wav_out}


def _stream(job: _Job, stop) -> dict:
    from .components import MODEL_FILES, load_components
    from .metrics import stream_metrics, write_json
    from .stopping import exit_code

    run, writer = job.run, job.writer
    prof, model, seed = run.profile, run.model, run.model.seed
    try:
        comps = load_components(prof, run.paths and Path(model.model_dir), dit_device=run.dit_device,
                                vae_device=run.vae_device, dtype=prof.dtype, seed=seed, ema=model.ema,
                                decoders=run.decoders)
    except CheckpointError as e:
        raise InputError(f"{e}\n(expected the official files: {MODEL_FILES})") from e
    sess = StreamSession(comps, prof, dit=run.dit, decoders=run.decoders, backend=run.backend,
                         backend_choice=run.backend_choice, blocks=ENDLESS if run.nblocks is None else run.nblocks)
    ctx, _ = sess.encode(job.prompt, release=not job.prompt_at)
    encode_s = sess.text_encode_s
    last = len(job.prompt_at) - 1
    switches = [(at, sess.encode(text, release=k == last)[0]) for k, (at, text) in enumerate(job.prompt_at)]
    sess.text_encode_s = encode_s  # the metrics' text_encode_s is the first prompt's
    for _ in range(job.warmup_runs):  # graph/kernel warm-up streams, not timed, not written, no ranges
        from hallolive_rt.nvtx import suppressed

        with suppressed():
            for _blk in sess.run(ctx, seed):
                pass
    for at, sw_ctx in switches:  # after the warm-up runs, which would drop them
        sess.switch_prompt(sw_ctx, at_block=at)
    written: list[DecodedBlock] = []  # times and counts only: an endless stream must not keep its frames

    def on_block(b: DecodedBlock) -> None:  # on the writer thread (or inline)
        writer.write_block(b.frames, b.audio)
        written.append(b.without_media())  # shares b.times: io_write lands after this returns

    sess.pipeline.on_block = on_block
    stop.graceful = True  # from here a first SIGINT / SIGTERM ends the stream at the next block boundary
    blocks = sess.run(ctx, seed)
    with writer, StreamProgress(job.console, run.nblocks, job.progress) as bar:
        try:
            for blk in blocks:
                bar.update(blk)
                if stop.requested:
                    break
        finally:
            blocks.close()  # the run's end drains what is decoding (written); the writer then ends both tracks
    if writer.error is not None:  # a write failed while the pipeline drained
        raise writer.error
    w = writer.summary
    generated = sum(b.frames.shape[0] for b in written)
    summary = {**_paths(job.outputs), "writer": w, "blocks": len(written), "frames_generated": generated,
               "frames_written": w.get("frames", generated) + w.get("held_frames", 0),
               "audio_samples": sum(b.audio.shape[0] for b in written), "session": sess.describe()}
    if stop.requested:
        summary.update(interrupted=stop.name, exit_code=exit_code(stop.signum))
    metrics = job.outputs.metrics
    if metrics is not None:
        m = stream_metrics(sorted(written, key=lambda b: b.index), fps=float(job.fps),
                           text_encode_s=sess.text_encode_s, device=str(run.dit_device), dtype=prof.dtype_name,
                           extra={"command": "hallolive-rt stream", "preset": prof.name, "seed": seed,
                                  "weights": comps.source, "vae_device": str(run.vae_device),
                                  "frames_generated": generated, "frames_written": summary["frames_written"],
                                  "session": sess.describe(), "writer": w})
        try:
            write_json(m, metrics)
        except OSError as e:
            Path(str(metrics) + ".tmp").unlink(missing_ok=True)
            raise OutputWriteError(f"the stream is complete, but its metrics could not be written to "
                                   f"{metrics}: {e}") from None
        summary["metrics"] = m
    return summary


def check_utf8(prompt: str, what_prompt: str = "the prompt") -> None:
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
