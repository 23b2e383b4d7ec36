"""The run half of ``stream_main`` (``runtime/session.py`` validates; this streams what it validated).

    claim the outputs (runtime/outputs.py: one writer per file, no silent overwrite)
    -> SIGINT / SIGTERM handlers (runtime/stopping.py)
    -> artifact check (compiled backends), load, encode, warm-up
    -> stream: each block written on the writer thread, progress per block, stop at a block boundary
       on the first signal
    -> summary (+ ``interrupted`` / ``exit_code`` after a signal) and the metrics JSON

Nothing here validates user input again; everything it refuses (a held output, an existing one, an
artifact directory that does not fit) is refused before any weight is loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from hallolive_rt.cache_policy import ENDLESS, variant_plans

from .decode_pipeline import DecodedBlock
from .session import InputError, StreamSession

__all__ = ["claim_and_stream"]


def claim_and_stream(run: dict, overwrite: bool) -> dict:
    """Claim the outputs (lock, no silent overwrite), then stream under SIGINT / SIGTERM handling."""
    from .outputs import OutputClaimError, claim_outputs
    from .stopping import StopSignals, StreamInterrupted, exit_code

    o = run["outputs"]
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopSignals())  # first: a signal while claiming still releases the claims
        try:
            try:
                stack.enter_context(claim_outputs([("--out", o["out"]), ("--frames-out", o["frames_out"]),
                                                   ("--wav-out", o["wav_out"]), ("--metrics", run["metrics"])],
                                                  overwrite=overwrite))
            except OutputClaimError as e:
                raise InputError(str(e)) from None
            return _stream(run, stop)
        except StreamInterrupted as e:  # before the stream started, or a second signal: ends now
            summary = {**o, "writer": run["writer"].summary, "blocks": run["writer"].summary.get("blocks", 0)}
            return {**summary, "interrupted": e.name, "exit_code": exit_code(e.signum)}


def _stream(run: dict, stop) -> dict:
    from hallolive_rt.export.manifest import ArtifactMismatch
    from hallolive_rt.weights import CheckpointError

    from .backends.artifacts import ArtifactBackend
    from .components import MODEL_FILES, load_components
    from .metrics import stream_metrics, write_json
    from .stopping import exit_code

    prof, policy, be, writer, console = run["prof"], run["policy"], run["be"], run["writer"], run["console"]
    dit_dev, seed, nblocks = run["dit_dev"], run["seed"], run["nblocks"]
    if isinstance(be, ArtifactBackend):  # the manifest, contracts, layout and variants: before any weight
        try:
            be.check(prof, policy.layout(), {p.variant for p in variant_plans(policy)}, dit_dev, prof.dtype)
        except ArtifactMismatch as e:
            raise InputError(str(e)) from None
    try:
        comps = load_components(prof, run["paths"] and Path(run["model_dir"]), dit_device=dit_dev,
                                vae_device=run["vae_dev"], dtype=prof.dtype, seed=seed, ema=run["ema"])
    except CheckpointError as e:
        raise InputError(f"{e}\n(expected the official files: {MODEL_FILES})") from e
    sess = StreamSession(comps, prof, backend=be, blocks=ENDLESS if nblocks is None else nblocks,
                         cache_policy=run["cache_policy"], kv_impl=run["kv_impl"], overlap=run["overlap"],
                         fuse_projections=run["fuse_projections"], attn_kernel=run["attn_kernel"],
                         video_runner=run["vae_opts"], levers=run["levers"])
    prompt_at = run["prompt_at"]
    ctx, _ = sess.encode(run["prompt"], release=not prompt_at)
    encode_s = sess.text_encode_s
    switches = [(at, sess.encode(text, release=k == len(prompt_at) - 1)[0]) for k, (at, text) in enumerate(prompt_at)]
    sess.text_encode_s = encode_s  # the metrics' text_encode_s is the first prompt's
    for _ in range(run["warmup_runs"]):  # graph/kernel warm-up streams, not timed, not written, no ranges
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
    with writer, _Progress(console, nblocks, run["progress"]) as bar:
        try:
            for blk in blocks:
                bar.update(blk)
                if stop.requested:
                    break
        finally:
            blocks.close()  # the run's end drains what is decoding (written); the writer then ends both tracks
    if writer.error is not None:  # a write failed while the pipeline drained
        raise writer.error
    summary = {**run["outputs"], "writer": writer.summary, "blocks": len(written),
               "frames": sum(b.frames.shape[0] for b in written),
               "audio_samples": sum(b.audio.shape[0] for b in written), "session": sess.describe()}
    if stop.requested:
        summary.update(interrupted=stop.name, exit_code=exit_code(stop.signum))
    if run["metrics"] is not None:
        m = stream_metrics(sorted(written, key=lambda b: b.index), fps=float(run["fps"]),
                           text_encode_s=sess.text_encode_s, device=str(dit_dev), dtype=prof.dtype_name,
                           extra={"command": "hallolive-rt stream", "preset": prof.name, "seed": seed,
                                  "weights": comps.source, "vae_device": str(run["vae_dev"]),
                                  "session": sess.describe(), "writer": writer.summary})
        try:
            write_json(m, run["metrics"])
        except OSError as e:
            Path(str(run["metrics"]) + ".tmp").unlink(missing_ok=True)
            from .media import OutputWriteError

            raise OutputWriteError(f"the stream is complete, but its metrics could not be written to "
                                   f"{run['metrics']}: {e}") from None
        summary["metrics"] = m
    return summary


class _Progress:
    """A rich progress bar on a terminal (fits 80 columns: the bar keeps its width, the block details are
    cut with an ellipsis); one plain line per block otherwise (logs, pipes), endless streams included."""

    def __init__(self, console, total: int | None, enabled: bool):  # total None: an endless stream
        self.console, self.total, self.enabled = console, total, enabled
        self.bar = None

    def __enter__(self):
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            self.bar = Progress(BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}",
                                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                console=self.console, expand=True)
            self.bar.start()
            self.task = self.bar.add_task("stream", total=self.total, info="")
        return self

    def update(self, b: DecodedBlock) -> None:
        vae = b.times["vae_video"] + b.times["vae_audio"]
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"DiT {b.times['dit']:.0f} ms, VAE {vae:.0f} ms, "
                                                       f"first frame {b.first_frame_s:.2f} s")
        elif self.enabled:
            of = "" if self.total is None else f"/{self.total}"
            self.console.print(f"[{b.index + 1}{of}] block {b.index}: {b.frames.shape[0]} frames, dit "
                               f"{b.times['dit']:.0f} ms, vae {vae:.0f} ms, first frame at {b.first_frame_s:.2f} s",
                               highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
