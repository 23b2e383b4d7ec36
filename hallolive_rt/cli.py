"""`hallolive-rt`: a thin typer shell over library functions.

Heavy imports happen inside the commands so `--help` stays instant. Every command validates its inputs
before opening outputs; bad input exits with code 2 and a message saying what to change. Help is plain
click formatting (no rich panels): it wraps to the terminal and never cuts an option name or its text.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Streaming text-to-talking-avatar (video + speech) inference for Hallo-Live. "
         "Run `hallolive-rt stream` for the embedded tiny demo (random weights, CPU, no downloads).",
)

DEMO_PROMPT = "A young woman with short dark hair looks into the camera and says: <S>Hello, and welcome.<E>"


class Backend(str, Enum):
    eager = "eager"
    cudagraph = "cudagraph"
    compiled = "compiled"
    aoti = "aoti"
    tensorrt = "tensorrt"


class KVImpl(str, Enum):
    ext = "ext"
    torch = "torch"


class Policy(str, Enum):
    auto = "auto"
    append = "append"
    rolling = "rolling"


class AttnKernel(str, Enum):  # = hallolive_rt.model.attention.ATTENTION_KERNELS (a test holds them equal)
    auto = "auto"
    math = "math"
    flash = "flash"
    cudnn = "cudnn"
    efficient = "efficient"


class Precision(str, Enum):  # = hallolive_rt.runtime.levers.PRECISIONS (a test holds them equal)
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"
    fp8 = "fp8"


class ActScale(str, Enum):  # = hallolive_rt.model.fp8.ACT_SCALES
    token = "token"
    tensor = "tensor"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# options shared by `stream` and `profile` (one definition; typer reads defaults from these objects)
PROMPT = typer.Option(DEMO_PROMPT, "--prompt", "-p", help="Text prompt (speech between <S> and <E>).")
MODEL_DIR = typer.Option(None, "--model-dir", help="Root of the official downloads, holding "
                         "Hallo-Live/hallolive_dit.pt, Wan2.2-TI2V-5B/Wan2.2_VAE.pth, "
                         "MMAudio/ext_weights/v1-16.pth, MMAudio/ext_weights/best_netG.pt, "
                         "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/.")
RANDOM = typer.Option(False, "--random-weights", help="The architecture with random weights (benchmarks); "
                      "the tiny preset always uses random weights.")
PRESET = typer.Option("tiny", "--preset", help="Shape preset from profiles/: tiny (CPU demo) or hallolive-512x992.")
BLOCKS = typer.Option(None, "--blocks", min=1, help="Blocks to run. Default: the preset's clip (5 at full size).")
STREAM_BLOCKS = typer.Option(None, "--blocks", metavar="N|endless", help="Blocks to stream: any N, or 'endless' "
                             "(until interrupted). Up to the preset's clip (5 at full size) the released append "
                             "caches; past it the rolling policy keeps memory and block time flat. Default: "
                             "the preset's clip.")
FUTURE = typer.Option(None, "--future-audio-frames", min=0, help="Audio lookahead F in audio tokens: each "
                      "block denoises a window of 30+F tokens (the future ones from the next blocks' noise) and "
                      "commits 30. F may go up to what the 1024-position audio RoPE table leaves after the "
                      "longest history the cache policy feeds (874 at full size, 994 tiny); more is refused "
                      "up front. Default: the preset's (0).")
SEED = typer.Option(0, "--seed", help="Seed of the initial and re-noise draws (and of the random weights).")
ARTIFACTS = typer.Option(None, "--artifacts", metavar="DIR", help="The --out-dir of `hallolive-rt export "
                         "--format aoti|tensorrt`, for --backend(s) aoti|tensorrt: checked against its "
                         "manifest (profile, weights, contracts, tools, device) before any weight is loaded.")
DEVICE = typer.Option("cpu", "--device", "--dit-device", help="Device of the DiT (and of everything unless "
                      "--vae-device is given): cpu, cuda, cuda:0 ...")
VAE_DEVICE = typer.Option(None, "--vae-device", help="Device of the video/audio decoders (e.g. cuda:1: "
                          "the decode of block i overlaps the DiT's context pass of block i and block i+1).")
DTYPE = typer.Option(None, "--dtype", help="Compute dtype. Default: the preset's (bf16 full size, fp32 tiny).")
BACKEND = typer.Option(Backend.eager, "--backend", help="eager (reference), cudagraph (CUDA), compiled "
                       "(cudagraph with the DiT's layers compiled by inductor, opt-in), aoti or tensorrt (the DiT "
                       "from `hallolive-rt export` artifacts: pass --artifacts DIR).")
KV = typer.Option(KVImpl.ext, "--kv-impl", help="KV-cache ops: ext (our C++/CUDA extension, built on first "
                  "use) or torch (pure-torch reference).")
POLICY = typer.Option(Policy.auto, "--cache-policy", help="append (released, up to the preset's blocks), "
                      "rolling (sink + ring, endless) or auto.")

FUSE = typer.Option(False, "--fuse-projections/--no-fuse-projections", help="Opt-in fast path: run q/k/v of "
                    "each self-attention, and k/v of each text and fusion cross-attention, as one GEMM per group "
                    "(same weights and names; results equal within rounding). Off by default, as released, "
                    "until `hallolive-rt bench` on a GPU shows it pays. eager and cudagraph backends only.")
ATTN = typer.Option(AttnKernel.auto, "--attn-kernel", help="Opt-in: the one SDPA kernel every attention uses. "
                    "auto lets PyTorch pick per call (default, as released); math, flash, cudnn (CUDA), "
                    "efficient (CUDA) force one, and one that cannot run on the device and dtype is refused "
                    "up front, never silently replaced. eager and cudagraph backends only.")
VAE_BACKEND = typer.Option("eager", "--vae-backend", help="Opt-in video decoder fast path (H100, decoders "
                          "only: channels_last_3d 1.06x, cudagraph 0.99x): eager (reference, default), compiled "
                          "(torch.compile, fullgraph), cudagraph (each per-frame decode replayed from a CUDA graph), "
                          "compiled-cudagraph (both). A +cl3d suffix "
                          "is the same as --vae-channels-last. bench: a comma-separated list, each a run "
                          "(--mode vae runs the eager baseline first, in the same process).")
VAE_CL = typer.Option(False, "--vae-channels-last/--no-vae-channels-last", help="Opt-in: the video decoder's "
                      "conv weights, caches and input in channels_last_3d layout (same values; for cuDNN's "
                      "NDHWC kernels). Off by default until a GPU run shows it pays.")
EMA = typer.Option(False, "--ema/--no-ema", help="With --model-dir, for a training checkpoint nested under "
                   "generator_ema/generator: load the EMA weights (the release's --use_ema) or the generator "
                   "(default, as the release's inference.py). The released flat hallolive_dit.pt ignores it.")

PRECISION = typer.Option(None, "--precision", help="bf16 | fp16 | fp32: the compute dtype (same as --dtype). "
                         "fp8 (opt-in, Hopper): the DiT's Linear GEMMs in float8 e4m3 with per-row weight "
                         "scales and dynamic activation scales (torch._scaled_mm; emulated where it cannot run), "
                         "the rest in bf16 (fp32 on the tiny preset); as `export --precision fp8` but with "
                         "dynamic instead of calibrated activation scales. eager/cudagraph/compiled backends.")
FP8_ACT = typer.Option(ActScale.token, "--fp8-act-scale", help="With --precision fp8: one activation scale per "
                       "token (default) or per tensor, computed on the fly.")
LEAN = typer.Option(False, "--lean-context/--no-lean-context", help="Opt-in: the t=0 context pass computes "
                    "only what reaches a KV cache (the last layer stops after its cache writes, no output heads); "
                    "caches bit-identical to the full pass. eager/cudagraph/compiled backends.")


def _levers(precision, fp8_act_scale, lean_context):
    from hallolive_rt.runtime.levers import DiTLevers

    return DiTLevers(precision=None if precision is None else precision.value, fp8_act_scale=fp8_act_scale.value,
                     lean_context=lean_context)


@app.command()
def stream(
    prompt: str = PROMPT,
    model_dir: Optional[Path] = MODEL_DIR,
    random_weights: bool = RANDOM,
    preset: str = PRESET,
    blocks: Optional[str] = STREAM_BLOCKS,
    future_audio_frames: Optional[int] = FUTURE,
    seed: int = SEED,
    out: Path = typer.Option(Path("hallolive.mp4"), "--out", "-o", help="Fragmented MP4 (H.264 + AAC), "
                             "written block by block: an interrupted stream leaves a playable file. One "
                             "writer per file: a second stream onto it is refused."),
    frames_out: Optional[Path] = typer.Option(None, "--frames-out", help="Also write raw frames (.y4m)."),
    wav_out: Optional[Path] = typer.Option(None, "--wav-out", help="Also write the 16 kHz audio (.wav)."),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="Write per-block times, TTFF, steady FPS, "
                                           "frames, audio samples, device, dtype as JSON."),
    device: str = DEVICE,
    vae_device: Optional[str] = VAE_DEVICE,
    dtype: Optional[DType] = DTYPE,
    backend: Backend = BACKEND,
    kv_impl: KVImpl = KV,
    cache_policy: Policy = POLICY,
    fuse_projections: bool = FUSE,
    attn_kernel: AttnKernel = ATTN,
    precision: Optional[Precision] = PRECISION,
    fp8_act_scale: ActScale = FP8_ACT,
    lean_context: bool = LEAN,
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="Accept cutting a prompt longer "
                                         "than 512 tokens (otherwise it is refused, saying what would be cut)."),
    warmup_runs: int = typer.Option(0, "--warmup-runs", min=0, help="Untimed, unwritten streams first "
                                    "(graph capture, autotuning); used by profiling sessions."),
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="Decode and write on their own "
                                 "threads/streams while the DiT runs the next block (default), or inline."),
    vae_backend: str = VAE_BACKEND,
    vae_channels_last: bool = VAE_CL,
    ema: bool = EMA,
    prompt_at: Optional[list[str]] = typer.Option(None, "--prompt-at", metavar="BLOCK:PROMPT", help="Switch to "
                                                  "PROMPT from block BLOCK on (counted from 0; repeatable), e.g. "
                                                  "--prompt-at 3:\"A man smiles ...\". The caches of earlier blocks "
                                                  "stay; every prompt is encoded before the stream starts."),
    artifacts: Optional[Path] = ARTIFACTS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs (--out, --frames-out, "
                                   "--wav-out, --metrics) that exist; without it they are refused."),
):
    """Stream a prompt to a synchronized MP4, block by block (default: the tiny random demo on CPU).

    SIGINT (Ctrl-C) or SIGTERM ends the stream at the next block boundary: the file stays playable, both
    tracks end together, and the exit code is 130 / 143. Progress: a bar on a terminal, one line per
    block otherwise."""
    try:
        from hallolive_rt.runtime.media import MediaError
        from hallolive_rt.runtime.session import InputError, parse_prompt_at, stream_main
    except KeyboardInterrupt:
        _interrupted_early()
    try:
        switches = [parse_prompt_at(spec) for spec in prompt_at or []]
    except ValueError as e:
        _fail(str(e))
    try:
        summary = stream_main(
            prompt, out=str(out), preset=preset, model_dir=None if model_dir is None else str(model_dir),
            random_weights=random_weights, blocks=blocks, future_audio_frames=future_audio_frames, seed=seed,
            metrics=None if metrics is None else str(metrics), device=device, vae_device=vae_device,
            dtype=None if dtype is None else dtype.value, backend=backend.value, cache_policy=cache_policy.value,
            kv_impl=kv_impl.value, frames_out=None if frames_out is None else str(frames_out),
            wav_out=None if wav_out is None else str(wav_out), truncate_prompt=truncate_prompt,
            warmup_runs=warmup_runs, overlap=overlap, fuse_projections=fuse_projections,
            attn_kernel=attn_kernel.value, progress=True, vae_backend=vae_backend,
            vae_channels_last=vae_channels_last, ema=ema, levers=_levers(precision, fp8_act_scale, lean_context),
            prompt_at=switches, artifacts=None if artifacts is None else str(artifacts), overwrite=overwrite)
    except KeyboardInterrupt:  # Ctrl-C before stream_main took over the signals
        _interrupted_early()
    except (InputError, MediaError) as e:  # MediaError: an output failed mid-stream (disk full, ...)
        _fail(str(e), getattr(e, "exit_code", 2))
    if summary.get("interrupted"):
        typer.echo(_interrupted_line(summary), err=True)
        raise typer.Exit(summary["exit_code"])
    typer.echo(f"wrote {out} ({summary.get('frames', '?')} frames, {summary.get('audio_samples', '?')} audio samples)")


def _interrupted_early() -> None:
    typer.echo("interrupted by SIGINT before the stream started: nothing was written", err=True)
    raise typer.Exit(130)


def _interrupted_line(summary: dict) -> str:
    w, sig = summary.get("writer") or {}, summary["interrupted"]
    if not w.get("blocks"):
        return f"interrupted by {sig} before the first block: nothing was written"
    files = ", ".join(str(summary[k]) for k in ("out", "frames_out", "wav_out") if summary.get(k))
    return (f"interrupted by {sig}: wrote {w['blocks']} blocks ({w['video_s']:.2f} s of video, {w['audio_s']:.2f} s "
            f"of audio) to {files}; the file is complete and playable")


@app.command()
def export(
    preset: str = typer.Option("tiny", "--preset", help="Shape preset whose static shapes are exported."),
    model_dir: Optional[Path] = MODEL_DIR,
    random_weights: bool = RANDOM,
    format: str = typer.Option("onnx", "--format", help="onnx | tensorrt | aoti"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp16 | fp32 (CPU checks) | fp8 (ONNX/"
                                            "TensorRT: the DiT's Linear GEMMs as calibrated float8 Q/DQ, the rest "
                                            "bf16; calibration needs a GPU at full size). Default: the preset's dtype."),
    out_dir: Path = typer.Option(Path("artifacts"), "--out-dir", help="Artifact directory (with manifest.json); "
                                 "created if missing. Give it to stream/bench/profile as --artifacts."),
    submodels: Optional[str] = typer.Option(None, "--submodels", help="Comma-separated subset: dit, vae_video, "
                                            "audio, text (default: all)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even artifacts that are up to date."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights (--random-weights and the tiny "
                             "preset); the manifest records it as the weights' id, random:<seed>."),
    ema: bool = EMA,
):
    """Export every sub-model with the preset's static shapes (ONNX, TensorRT plans or AOTInductor .pt2),
    with a manifest that the runtime checks before it trusts an artifact.

    ONNX traces on the meta device and streams the weights, one tensor at a time, into one .weights file
    per sub-model that all its graphs share: the full-size preset exports on a 24 GB machine (~34 GiB of
    disk). Re-running skips what is up to date; memory and disk are checked before anything is written."""
    from hallolive_rt.export.main import ExportError, export_main
    from hallolive_rt.weights import CheckpointError

    try:
        export_main(preset, None if model_dir is None else str(model_dir), random_weights, format=format,
                    precision=precision, out_dir=str(out_dir), seed=seed, force=force,
                    submodels=None if submodels is None else submodels.split(","), ema=ema)
    except (ExportError, CheckpointError, ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def bench(
    preset: str = typer.Option("hallolive-512x992", "--preset", help="Shape preset from profiles/ (or a .toml "
                               "path): hallolive-512x992 (default, the released shapes) or tiny."),
    random_weights: bool = typer.Option(True, "--random-weights/--no-random-weights", help="The architecture "
                                        "with random weights built on the device (default), or the release "
                                        "weights of --model-dir."),
    model_dir: Optional[Path] = MODEL_DIR,
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends (eager, "
                                           "cudagraph, compiled, aoti, tensorrt), run one after the other in one "
                                           "process. Default: the ones that can run here (eager, plus cudagraph "
                                           "on CUDA, plus the --artifacts format)."),
    artifacts: Optional[Path] = ARTIFACTS,
    blocks: Optional[int] = BLOCKS,
    mode: str = typer.Option("e2e", "--mode", help="e2e | dit | vae (dit/vae give the projected two-device rate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON result (commit it under bench/results/)."),
    device: str = typer.Option("cuda", "--device", "--dit-device", help="Device of the DiT (and of the decoders unless "
                               "--vae-device is given): cuda (default), cuda:N or cpu."),
    vae_device: Optional[str] = VAE_DEVICE,
    dtype: Optional[DType] = DTYPE,
    kv_impl: KVImpl = KV,
    fuse_projections: bool = FUSE,
    attn_kernel: AttnKernel = ATTN,
    precision: Optional[Precision] = PRECISION,
    fp8_act_scale: ActScale = FP8_ACT,
    lean_context: bool = LEAN,
    seed: int = SEED,
    vae_backend: str = VAE_BACKEND,
    vae_channels_last: bool = VAE_CL,
    overlap: bool = typer.Option(True, "--overlap/--no-overlap", help="e2e: decode block i on its own "
                                 "(low-priority) stream while the DiT runs block i+1 (default), or inline."),
    compare_overlap: bool = typer.Option(False, "--compare-overlap", help="e2e: run every variant both "
                                         "overlapped and sequential in this process (keys '... no-overlap')."),
    ema: bool = EMA,
):
    """Benchmark backends on the full-size architecture (random weights built on the device). The JSON
    records --fuse-projections, --attn-kernel, --precision and --lean-context (and each backend's compile
    time): run once with and once without to see what they buy."""
    from hallolive_rt.runtime.bench import bench_main

    try:
        bench_main(preset, random_weights=random_weights and model_dir is None,
                   backends=None if backends is None else [b.strip() for b in backends.split(",") if b.strip()],
                   artifacts=None if artifacts is None else str(artifacts),
                   blocks=blocks, mode=mode, out_json=out, device=device, vae_device=vae_device,
                   dtype=None if dtype is None else dtype.value,
                   model_dir=None if model_dir is None else str(model_dir), seed=seed, kv_impl=kv_impl.value,
                   fuse_projections=fuse_projections, attn_kernel=attn_kernel.value, vae_backend=vae_backend,
                   vae_channels_last=vae_channels_last, overlap=overlap, compare_overlap=compare_overlap, ema=ema,
                   levers=_levers(precision, fp8_act_scale, lean_context))
    except ValueError as e:
        _fail(str(e))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HALLOLIVE_TOKEN", help="Secret every WebSocket "
                                        "must present (?token=... or Authorization: Bearer); required for a "
                                        "non-loopback --host. Also read from HALLOLIVE_TOKEN."),
    max_sessions: int = typer.Option(1, "--max-sessions", min=1, help="Concurrent sessions of this process "
                                     "(each holds its own caches); one more gets a busy event and close 1013."),
    preset: str = PRESET,
    model_dir: Optional[Path] = MODEL_DIR,
    random_weights: bool = RANDOM,
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights (tiny preset / --random-weights); "
                             "clients choose the noise seed per session."),
    device: str = DEVICE,
    vae_device: Optional[str] = VAE_DEVICE,
    dtype: Optional[DType] = DTYPE,
    backend: Backend = BACKEND,
    kv_impl: Optional[KVImpl] = typer.Option(None, "--kv-impl", help="KV-cache ops: ext (our C++/CUDA "
                                             "extension, built at the first start) or torch (reference). "
                                             "Default: ext on CUDA, torch on CPU (the page plays without a build)."),
    max_blocks: Optional[int] = typer.Option(None, "--max-blocks", min=1, help="Longest session a client may ask "
                                             "for, in blocks (default: endless sessions allowed)."),
    max_prompt_chars: int = typer.Option(2000, "--max-prompt-chars", min=1, help="Longest prompt accepted."),
    max_unacked_blocks: int = typer.Option(4, "--max-unacked-blocks", min=1, help="Blocks sent and not yet "
                                           "acknowledged before generation pauses (bounds memory per client)."),
    client_timeout: float = typer.Option(30.0, "--client-timeout", min=0.1, help="Seconds without an ack "
                                         "(while paused) or without a send completing before a client is dropped."),
    allow_origin: Optional[list[str]] = typer.Option(None, "--allow-origin", help="Extra page origin allowed "
                                                     "to connect (repeatable; default: only this server's own)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: warning, info, debug."),
    use_ray: bool = typer.Option(False, "--ray", help="Scale out on Ray Serve: --replicas worker processes, "
                                 "each with its own GPU(s) and --max-sessions sessions, behind Ray's proxy on "
                                 "--host/--port (README, \"Scale-out on Ray Serve\"). Needs the ray extra."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: replicas (GPU worker processes)."),
    gpus_per_replica: Optional[int] = typer.Option(None, "--gpus-per-replica", min=0, max=2, help="With --ray: "
                                                   "1 (DiT and decoders on one GPU) or 2 (decoders on the second); "
                                                   "0 for CPU. Default: 1 with --device cuda, 0 with cpu."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running cluster "
                                              "(auto, or ray://head:10001); default: start Ray on this machine."),
):
    """Serve live sessions: a page at / that plays the stream as it is generated (prompt switching
    included) and the WebSocket protocol behind it (README, "Live sessions"). Needs the serve extra."""
    from hallolive_rt.runtime.serve.launch import RAY_EXTRA_HINT, SERVE_EXTRA_HINT, missing_ray_deps, missing_serve_deps

    if not use_ray and (replicas != 1 or gpus_per_replica is not None or ray_address is not None):
        _fail("--replicas, --gpus-per-replica and --ray-address go with --ray")
    if use_ray and missing_ray_deps():
        _fail(f"{', '.join(missing_ray_deps())} not installed: {RAY_EXTRA_HINT}")
    if missing_serve_deps():
        _fail(f"{', '.join(missing_serve_deps())} not installed: {SERVE_EXTRA_HINT}", 3)
    from hallolive_rt.runtime.serve.launch import serve_main
    from hallolive_rt.runtime.serve.protocol import Limits
    from hallolive_rt.runtime.session import InputError

    limits = Limits(max_prompt_chars=max_prompt_chars, max_blocks=max_blocks,
                    max_unacked_blocks=max_unacked_blocks, client_timeout_s=client_timeout)
    try:
        if use_ray:
            from hallolive_rt.runtime.serve.ray import args_from_cli, serve_ray_main

            serve_ray_main(args_from_cli(
                device=device, vae_device=vae_device, gpus_per_replica=gpus_per_replica, replicas=replicas,
                limits=limits, token=token, allowed_origins=allow_origin or (), preset=preset,
                model_dir=None if model_dir is None else str(model_dir), random_weights=random_weights, seed=seed,
                dtype=None if dtype is None else dtype.value, backend=backend.value,
                kv_impl=None if kv_impl is None else kv_impl.value, max_sessions=max_sessions),
                host=host, port=port, address=ray_address,
                on_ready=lambda url: typer.echo(f"live sessions (Ray Serve) at {url}", err=True))
            return
        serve_main(host=host, port=port, token=token, allowed_origins=allow_origin or (), log_level=log_level,
                   on_ready=lambda url: typer.echo(f"live sessions at {url}", err=True), preset=preset,
                   model_dir=None if model_dir is None else str(model_dir), random_weights=random_weights,
                   device=device, vae_device=vae_device, dtype=None if dtype is None else dtype.value,
                   backend=backend.value, kv_impl=None if kv_impl is None else kv_impl.value, seed=seed,
                   max_sessions=max_sessions,
                   limits=limits)
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    session: str = typer.Option("torch", "--session", help="nsys (Nsight Systems), ncu (Nsight Compute) or "
                                "torch (the PyTorch profiler: needs nothing installed)."),
    target: Optional[str] = typer.Option(None, "--target", help="--session ncu only: the kernel target from "
                                         "profiles/ncu.toml (dit, attention, gemm, context, vae, audio); "
                                         "default: the preset's."),
    out_dir: Path = typer.Option(Path("profile-out"), "--out-dir", help="Folder of the session's outputs (trace "
                                 "or report, and the stream's MP4 unless --out is given); created if missing."),
    warmup_runs: Optional[int] = typer.Option(None, "--warmup-runs", min=0, help="Streams run (unrecorded) "
                                              "before the profiled one, for graph capture and autotuning. "
                                              "Default: 1 (torch), the preset's (nsys, ncu)."),
):
    """Run `stream` under Nsight Systems / Nsight Compute, or the PyTorch profiler (`--session torch`).

    Every other option is passed to `hallolive-rt stream` (e.g. --preset tiny --blocks 2) and checked
    before anything runs. The stream writes into --out-dir unless given --out (an existing file is then
    refused without --overwrite). The torch session decodes inline (--no-overlap) unless told otherwise:
    its profiler records one thread.
    """
    from hallolive_rt.runtime import profiling

    if session not in profiling.SESSIONS:
        _fail(f"unknown --session {session!r}: choose {', '.join(profiling.SESSIONS)}")
    if target is not None:
        if session != "ncu":
            _fail(f"--target picks an Nsight Compute kernel target: it applies to --session ncu, not {session}")
        try:
            profiling.load_session_preset("ncu").get_target(target)
        except profiling.PresetError as e:
            _fail(f"--target: {e}")
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"--out-dir {str(out_dir)!r} is a file, not a folder: choose a folder path")
    stream_args = _profile_stream_args(list(ctx.args), out_dir, session)
    created = not out_dir.exists()
    ok = False
    try:
        if session in ("nsys", "ncu"):
            cmd = profiling.build_command(session, None, stream_args, out_dir=str(out_dir), target=target,
                                          warmup_runs=warmup_runs)
            if profiling.find_profiler(session) is None:
                _fail(profiling.missing_profiler_message(session, cmd), 3)
            import subprocess

            out_dir.mkdir(parents=True, exist_ok=True)
            code = subprocess.call(cmd)
            ok = code == 0
            raise typer.Exit(code)
        trace, table = profiling.run_torch_session(lambda: _run_stream_args(stream_args), out_dir,
                                                   warmup_runs=1 if warmup_runs is None else warmup_runs)
        ok = True
    finally:
        if not ok and created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed session leaves no empty folder behind
    typer.echo(str(table))
    typer.echo(f"trace: {trace} (open in https://ui.perfetto.dev)")


def _profile_stream_args(args: list[str], out_dir: Path, session: str) -> list[str]:
    """The stream options of a profile, parsed (and refused) now: the MP4 goes into ``out_dir`` unless --out
    is given; outputs the user named must not exist without --overwrite (every profiled run rewrites them)."""
    from typer.main import get_command

    stream_cmd = get_command(app).commands["stream"]
    try:
        sctx = stream_cmd.make_context("stream", list(args))
    except typer.Exit:  # `--help` of stream: printed
        raise
    except typer.exceptions.TyperException as e:  # click's usage errors (typer vendors click)
        _fail(f"{getattr(e, 'format_message', e.__str__)()} (the options after the profile's own are `hallolive-rt stream` options: "
              f"see hallolive-rt stream --help)")
    args = list(args)
    named = [n for n in ("out", "frames_out", "wav_out", "metrics")
             if sctx.get_parameter_source(n).name == "COMMANDLINE"]
    for name in named if not sctx.params["overwrite"] else ():
        if Path(sctx.params[name]).exists():
            _fail(f"--{name.replace('_', '-')} {str(sctx.params[name])!r} exists; pass --overwrite to replace it, "
                  f"or choose another path")
    if "out" not in named:
        args += ["--out", str(out_dir / "stream.mp4")]  # the profile's own folder: rewritten like its traces
    if "--overwrite" not in args:
        args.append("--overwrite")  # checked above; warm-up runs of the torch session write them again
    if session == "torch" and "--overlap" not in args and "--no-overlap" not in args:
        # the PyTorch profiler records the thread that started it: decode inline so every stage is seen
        args.append("--no-overlap")
    return args


def _run_stream_args(args: list[str]) -> None:
    """Run `stream` with CLI-style args in this process (so the profiler sees it); its failure ends the
    profile with the stream's exit code."""
    from typer.main import get_command

    code = get_command(app).main(["stream", *args], standalone_mode=False)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
