"""`hallolive-rt`: a thin typer shell. Each command turns its flags into the typed options of
``hallolive_rt.options`` (one builder per concern, shared by every command that takes those flags) and
calls one library function; heavy imports happen inside the commands so `--help` stays instant. Bad input
exits with code 2 and a message saying what to change; help is plain click formatting."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from hallolive_rt import options as o
from hallolive_rt.errors import InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Streaming text-to-talking-avatar (video + speech) inference for Hallo-Live. "
         "Run `hallolive-rt stream` for the embedded tiny demo (random weights, CPU, no downloads).",
)

DEMO_PROMPT = "A young woman with short dark hair looks into the camera and says: <S>Hello, and welcome.<E>"


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


Backend = _choices("Backend", o.BACKEND_CHOICES)
KVImpl = _choices("KVImpl", o.KV_IMPLS)
Policy = _choices("Policy", o.CACHE_POLICIES)
AttnKernel = _choices("AttnKernel", o.ATTENTION_KERNELS)
Precision = _choices("Precision", o.PRECISIONS)
ActScale = _choices("ActScale", o.ACT_SCALES)
DType = _choices("DType", o.DTYPES)
VideoDecoder = _choices("VideoDecoder", o.VIDEO_DECODERS)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _str(p) -> str | None:
    return None if p is None else str(p)


def _val(e) -> str | None:
    return None if e is None else e.value


# ---- options shared by several commands (one definition each; typer reads defaults from these objects) ----
PROMPT = typer.Option(DEMO_PROMPT, "--prompt", "-p", help="Text prompt (speech between <S> and <E>).")
MODEL_DIR = typer.Option(None, "--model-dir", help="Root of the official downloads, holding "
                         "Hallo-Live/hallolive_dit.pt, Wan2.2-TI2V-5B/Wan2.2_VAE.pth, "
                         "MMAudio/ext_weights/v1-16.pth, MMAudio/ext_weights/best_netG.pt, "
                         "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/.")
RANDOM = typer.Option(False, "--random-weights", help="The architecture with random weights (benchmarks); "
                      "the tiny preset always uses random weights.")
PRESET = typer.Option("tiny", "--preset", help="Shape preset from profiles/: tiny (CPU demo) or hallolive-512x992.")
SEED = typer.Option(0, "--seed", help="Seed of the random weights (and, for stream and bench, of the noise).")
EMA = typer.Option(False, "--ema/--no-ema", help="With --model-dir, for a training checkpoint nested under "
                   "generator_ema/generator: load the EMA weights (the release's --use_ema) or the generator "
                   "(default, as the release's inference.py). The released flat hallolive_dit.pt ignores it.")
DEVICE = typer.Option("cpu", "--device", "--dit-device", help="Device of the DiT (and of everything unless "
                      "--vae-device is given): cpu, cuda, cuda:0 ...")
VAE_DEVICE = typer.Option(None, "--vae-device", help="Device of the video/audio decoders (e.g. cuda:1: "
                          "the decode of block i overlaps the DiT's context pass of block i and block i+1).")
DTYPE = typer.Option(None, "--dtype", help="Compute dtype. Default: the preset's (bf16 full size, fp32 tiny).")
BACKEND = typer.Option("auto", "--backend", help="auto (default): on CUDA the fastest backend whose full-size "
                       "deviation from eager is committed and within the bf16 bound (README, \"Which backend "
                       "auto picks\"), eager on CPU; eager (reference); cudagraph (CUDA); compiled (cudagraph "
                       "with the DiT's layers compiled by inductor); aoti or tensorrt (the DiT from `hallolive-rt "
                       "export` artifacts: pass --artifacts DIR).")
ARTIFACTS = typer.Option(None, "--artifacts", metavar="DIR", help="The --out-dir of `hallolive-rt export "
                         "--format aoti|tensorrt`, for --backend aoti|tensorrt: checked against its manifest "
                         "(profile, weights, contracts, tools, device) before any weight is loaded.")
KV = typer.Option(None, "--kv-impl", help="KV-cache ops: ext (our C++/CUDA extension, built on first use) or "
                  "torch (pure-torch reference). Default: ext on CUDA, torch on CPU.")
POLICY = typer.Option("auto", "--cache-policy", help="append (released, up to the preset's blocks), rolling "
                      "(sink + ring, endless) or auto.")
FUSE = typer.Option(False, "--fuse-projections/--no-fuse-projections", help="Opt-in: q/k/v of each "
                    "self-attention, and k/v of each cross-attention, as one GEMM per group (same weights; results "
                    "equal within rounding). PyTorch-forward backends only.")
ATTN = typer.Option("auto", "--attn-kernel", help="Opt-in: the one SDPA kernel every attention uses. auto lets "
                    "PyTorch pick per call (default, as released); math, flash, cudnn, efficient force one, and one "
                    "that cannot run on the device and dtype is refused up front. PyTorch-forward backends only.")
PRECISION = typer.Option(None, "--precision", help="bf16 | fp16 | fp32: the compute dtype (same as --dtype). "
                         "fp8 (opt-in, Hopper): the DiT's Linear GEMMs in float8 e4m3 with per-row weight scales "
                         "and dynamic activation scales (torch._scaled_mm; emulated where it cannot run), the "
                         "rest in bf16 (fp32 on the tiny preset). PyTorch-forward backends only.")
FP8_ACT = typer.Option("token", "--fp8-act-scale", help="With --precision fp8: one activation scale per token "
                       "(default) or per tensor, computed on the fly.")
LEAN = typer.Option(False, "--lean-context/--no-lean-context", help="Opt-in: the t=0 context pass computes only "
                    "what reaches a KV cache; caches bit-identical to the full pass. PyTorch-forward backends only.")
VIDEO_DECODER = typer.Option("full", "--video-decoder", help="full (default): the Wan2.2 decoder; taew2_2 or "
                             "lighttaew2_2: a tiny preview decoder (~10M parameters, far fewer FLOPs per frame, "
                             "preview quality: README, \"Preview decoder\"), from --tiny-decoder-weights.")
TINY_WEIGHTS = typer.Option(None, "--tiny-decoder-weights", metavar="FILE", help="The taew2_2 / lighttaew2_2 "
                            "file (your download) for --video-decoder taew2_2|lighttaew2_2; without it (tiny "
                            "preset, --random-weights) the decoder has random weights.")
VAE_BACKEND = typer.Option("eager", "--vae-backend", help="Video decoder runner: eager (reference, default), "
                           "compiled (torch.compile, fullgraph), cudagraph (each per-frame decode replayed from a "
                           "CUDA graph), compiled-cudagraph (both); a +cl3d suffix is --vae-channels-last. "
                           "bench: a comma-separated list, each a run.")
VAE_CL = typer.Option(False, "--vae-channels-last/--no-vae-channels-last", help="The full video decoder's conv "
                      "weights, caches and input in channels_last_3d (same values; cuDNN's NDHWC kernels).")
OVERLAP = typer.Option(True, "--overlap/--no-overlap", help="Decode on its own thread/stream while the DiT runs "
                       "the next block (default), or inline.")


def _model(preset, model_dir, random_weights, seed, ema, dtype, device, vae_device) -> o.ModelSource:
    return o.ModelSource(preset=preset, model_dir=_str(model_dir), random_weights=random_weights, seed=seed, ema=ema,
                         dtype=_val(dtype), device=device, vae_device=vae_device)


def _dit(backend, artifacts, kv_impl, cache_policy, fuse_projections, attn_kernel, precision, fp8_act_scale,
         lean_context) -> o.DiTOptions:
    return o.DiTOptions(backend=backend, artifacts=_str(artifacts), kv_impl=_val(kv_impl), cache_policy=cache_policy,
                        fuse_projections=fuse_projections, attn_kernel=attn_kernel, precision=_val(precision),
                        fp8_act_scale=fp8_act_scale, lean_context=lean_context)


def _decoders(video_decoder, tiny_weights, vae_backend, vae_channels_last, overlap) -> o.DecoderOptions:
    return o.DecoderOptions(video_decoder=video_decoder.value, tiny_weights=_str(tiny_weights),
                            runner=o.VideoDecodeOptions.parse(vae_backend, vae_channels_last), overlap=overlap)


@app.command()
def stream(
    prompt: str = PROMPT, model_dir: Optional[Path] = MODEL_DIR, random_weights: bool = RANDOM,
    preset: str = PRESET,
    blocks: Optional[str] = typer.Option(None, "--blocks", metavar="N|endless", help="Blocks to stream: any N, or "
                                         "'endless' (until interrupted). Up to the preset's clip (5 at full size) "
                                         "the released append caches; past it the rolling policy keeps memory and "
                                         "block time flat (and the time to start does not grow with N). Default: "
                                         "the preset's clip."),
    future_audio_frames: Optional[int] = typer.Option(None, "--future-audio-frames", min=0, help="Audio lookahead "
                                                      "F in tokens: each block denoises 30+F tokens and commits 30. "
                                                      "F is refused up front past what the 1024-position audio "
                                                      "RoPE table leaves. Default: the preset's (0)."),
    seed: int = SEED,
    out: Path = typer.Option(Path("hallolive.mp4"), "--out", "-o", help="Fragmented MP4 (H.264 + AAC), written "
                             "block by block: an interrupted stream leaves a playable file. One writer per file."),
    frames_out: Optional[Path] = typer.Option(None, "--frames-out", help="Also write raw frames (.y4m)."),
    wav_out: Optional[Path] = typer.Option(None, "--wav-out", help="Also write the 16 kHz audio (.wav)."),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="Write per-block times, TTFF, steady FPS, frames "
                                           "generated and written, audio samples, device, dtype as JSON."),
    device: str = DEVICE, vae_device: Optional[str] = VAE_DEVICE, dtype: Optional[DType] = DTYPE,
    backend: str = BACKEND, artifacts: Optional[Path] = ARTIFACTS, kv_impl: Optional[KVImpl] = KV,
    cache_policy: str = POLICY, fuse_projections: bool = FUSE, attn_kernel: str = ATTN,
    precision: Optional[Precision] = PRECISION, fp8_act_scale: str = FP8_ACT, lean_context: bool = LEAN,
    video_decoder: VideoDecoder = VIDEO_DECODER, tiny_decoder_weights: Optional[Path] = TINY_WEIGHTS,
    vae_backend: str = VAE_BACKEND, vae_channels_last: bool = VAE_CL, overlap: bool = OVERLAP, ema: bool = EMA,
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="Accept cutting a prompt longer than "
                                         "512 tokens (otherwise it is refused, saying what would be cut)."),
    warmup_runs: int = typer.Option(0, "--warmup-runs", min=0, help="Untimed, unwritten streams first (graph "
                                    "capture, autotuning); used by profiling sessions."),
    prompt_at: Optional[list[str]] = typer.Option(None, "--prompt-at", metavar="BLOCK:PROMPT", help="Switch to "
                                                  "PROMPT from block BLOCK on (counted from 0; repeatable); the "
                                                  "caches of earlier blocks stay."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs (--out, --frames-out, --wav-out, "
                                   "--metrics) that exist; without it they are refused."),
):
    """Stream a prompt to a synchronized MP4, block by block (default: the tiny random demo on CPU).

    SIGINT (Ctrl-C) or SIGTERM ends the stream at the next block boundary: the file stays playable, both
    tracks end together, and the exit code is 130 / 143. Progress: a bar on a terminal, one line per
    block otherwise."""
    try:
        from hallolive_rt.errors import MediaError
        from hallolive_rt.runtime.session import parse_prompt_at
        from hallolive_rt.runtime.stream_run import stream_main
    except KeyboardInterrupt:
        _interrupted_early()
    try:
        summary = stream_main(
            prompt, model=_model(preset, model_dir, random_weights, seed, ema, dtype, device, vae_device),
            dit=_dit(backend, artifacts, kv_impl, cache_policy, fuse_projections, attn_kernel, precision,
                     fp8_act_scale, lean_context),
            decoders=_decoders(video_decoder, tiny_decoder_weights, vae_backend, vae_channels_last, overlap),
            outputs=o.OutputOptions(out=str(out), frames_out=_str(frames_out), wav_out=_str(wav_out),
                                    metrics=_str(metrics), overwrite=overwrite),
            blocks=blocks, future_audio_frames=future_audio_frames, truncate_prompt=truncate_prompt,
            warmup_runs=warmup_runs, prompt_at=[parse_prompt_at(spec) for spec in prompt_at or []])
    except KeyboardInterrupt:  # Ctrl-C before stream_main took over the signals
        _interrupted_early()
    except (InputError, MediaError) as e:  # MediaError: an output failed mid-stream (disk full, ...)
        _fail(str(e), getattr(e, "exit_code", 2))
    if summary.get("interrupted"):
        typer.echo(_interrupted_line(summary), err=True)
        raise typer.Exit(summary["exit_code"])
    written, generated = summary["frames_written"], summary["frames_generated"]
    held = f" ({written - generated} held to cover the audio)" if written != generated else ""
    typer.echo(f"wrote {out} ({written} frames written: {generated} generated{held}; "
               f"{summary['audio_samples']} audio samples)")


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
    model_dir: Optional[Path] = MODEL_DIR, random_weights: bool = RANDOM,
    format: str = typer.Option("onnx", "--format", help="onnx | tensorrt | aoti"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 | fp16 | fp32 (CPU checks) | fp8 (ONNX/"
                                            "TensorRT: the DiT's Linear GEMMs as calibrated float8 Q/DQ, the rest "
                                            "bf16; calibration needs a GPU at full size). Default: the preset's dtype."),
    out_dir: Path = typer.Option(Path("artifacts"), "--out-dir", help="Artifact directory (with manifest.json); "
                                 "created if missing. Give it to stream/bench/profile as --artifacts."),
    submodels: Optional[str] = typer.Option(None, "--submodels", help="Comma-separated subset: dit, vae_video, "
                                            "audio, text (default: all)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even artifacts that are up to date."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights; the manifest records it as the "
                             "weights' id, random:<seed>."),
    ema: bool = EMA,
):
    """Export every sub-model with the preset's static shapes (ONNX, TensorRT plans or AOTInductor .pt2),
    with a manifest that the runtime checks before it trusts an artifact.

    ONNX traces on the meta device and streams the weights, one tensor at a time, into one .weights file
    per sub-model that all its graphs share: the full-size preset exports on a 24 GB machine (~34 GiB of
    disk). Re-running skips what is up to date; memory and disk are checked before anything is written."""
    from hallolive_rt.errors import CheckpointError, ExportError
    from hallolive_rt.export.main import export_main

    try:
        export_main(_model(preset, model_dir, random_weights, seed, ema, None, "cpu", None), format=format,
                    precision=precision, out_dir=str(out_dir), force=force,
                    submodels=None if submodels is None else tuple(submodels.split(",")))
    except (ExportError, CheckpointError, InputError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def bench(
    preset: str = typer.Option("hallolive-512x992", "--preset", help="Shape preset from profiles/ (or a .toml "
                               "path): hallolive-512x992 (default, the released shapes) or tiny."),
    random_weights: bool = typer.Option(True, "--random-weights/--no-random-weights", help="The architecture with "
                                        "random weights built on the device (default), or the weights of --model-dir."),
    model_dir: Optional[Path] = MODEL_DIR,
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends, run one after the "
                                           "other in one process. Default: eager and what --backend picks, plus "
                                           "the --artifacts format."),
    backend: str = BACKEND, artifacts: Optional[Path] = ARTIFACTS,
    blocks: Optional[int] = typer.Option(None, "--blocks", min=1, help="Blocks to run. Default: the preset's clip."),
    mode: str = typer.Option("e2e", "--mode", help="e2e | dit | vae (dit/vae give the projected two-device rate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON result (commit it under bench/results/)."),
    device: str = typer.Option("cuda", "--device", "--dit-device", help="Device of the DiT (and of the decoders "
                               "unless --vae-device is given): cuda (default), cuda:N or cpu."),
    vae_device: Optional[str] = VAE_DEVICE, dtype: Optional[DType] = DTYPE, kv_impl: Optional[KVImpl] = KV,
    fuse_projections: bool = FUSE, attn_kernel: str = ATTN, precision: Optional[Precision] = PRECISION,
    fp8_act_scale: str = FP8_ACT, lean_context: bool = LEAN, seed: int = SEED,
    video_decoder: VideoDecoder = VIDEO_DECODER, tiny_decoder_weights: Optional[Path] = TINY_WEIGHTS,
    vae_backend: str = VAE_BACKEND, vae_channels_last: bool = VAE_CL, overlap: bool = OVERLAP,
    compare_overlap: bool = typer.Option(False, "--compare-overlap", help="e2e: run every variant both "
                                         "overlapped and sequential in this process (keys '... no-overlap')."),
    ema: bool = EMA,
):
    """Benchmark backends through the session's block loop on the full-size architecture (random weights
    built on the device). The JSON records every DiT option and decoder variant: run once with and once
    without an option to see what it buys."""
    from hallolive_rt.runtime.bench import bench_main

    try:
        variants = o.VideoDecodeOptions.parse_list(vae_backend, vae_channels_last)
        bench_main(_model(preset, model_dir, random_weights and model_dir is None, seed, ema, dtype, device,
                          vae_device),
                   _dit(backend, artifacts, kv_impl, "auto", fuse_projections, attn_kernel, precision,
                        fp8_act_scale, lean_context),
                   _decoders(video_decoder, tiny_decoder_weights, variants[0].label, False, overlap),
                   backends=None if backends is None else [b.strip() for b in backends.split(",") if b.strip()],
                   vae_variants=variants, blocks=blocks, mode=mode, out_json=out, compare_overlap=compare_overlap)
    except InputError as e:
        _fail(str(e))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HALLOLIVE_TOKEN", help="Secret every client must "
                                        "present (?token=... or Authorization: Bearer); required for a "
                                        "non-loopback --host. Also read from HALLOLIVE_TOKEN."),
    max_sessions: int = typer.Option(1, "--max-sessions", min=1, help="Concurrent sessions of this process "
                                     "(each holds its own caches); one more gets a busy event and close 1013."),
    preset: str = PRESET, model_dir: Optional[Path] = MODEL_DIR, random_weights: bool = RANDOM,
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights; clients choose the noise seed."),
    device: str = DEVICE, vae_device: Optional[str] = VAE_DEVICE, dtype: Optional[DType] = DTYPE,
    backend: str = BACKEND, artifacts: Optional[Path] = ARTIFACTS, kv_impl: Optional[KVImpl] = KV,
    fuse_projections: bool = FUSE, attn_kernel: str = ATTN, precision: Optional[Precision] = PRECISION,
    fp8_act_scale: str = FP8_ACT, lean_context: bool = LEAN,
    video_decoder: VideoDecoder = VIDEO_DECODER, tiny_decoder_weights: Optional[Path] = TINY_WEIGHTS,
    vae_backend: str = VAE_BACKEND, vae_channels_last: bool = VAE_CL, overlap: bool = OVERLAP, ema: bool = EMA,
    max_blocks: Optional[int] = typer.Option(None, "--max-blocks", min=1, help="Longest session a client may ask "
                                             "for, in blocks (default: endless sessions allowed)."),
    max_prompt_chars: int = typer.Option(2000, "--max-prompt-chars", min=1, help="Longest prompt accepted."),
    max_unacked_blocks: int = typer.Option(4, "--max-unacked-blocks", min=1, help="Blocks sent and not yet "
                                           "acknowledged before generation pauses (bounds memory per client)."),
    client_timeout: float = typer.Option(30.0, "--client-timeout", min=0.1, help="Seconds without an ack (while "
                                         "paused) or without a send completing before a client is dropped."),
    block_timeout: float = typer.Option(300.0, "--block-timeout", min=1.0, help="Seconds a session may go without "
                                        "producing a block before the watchdog ends it (error stalled, close 1011)."),
    allow_origin: Optional[list[str]] = typer.Option(None, "--allow-origin", help="Extra page origin allowed to "
                                                     "connect (repeatable; default: only this server's own)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: warning, info, debug."),
    webrtc: bool = typer.Option(False, "--webrtc", help="Also offer WebRTC (POST /webrtc/offer: video + Opus "
                                "tracks and a data channel with the same messages; README, \"Voice agents over "
                                "WebRTC\"). Needs the webrtc extra."),
    ice_server: Optional[list[str]] = typer.Option(None, "--ice-server", metavar="[USER:CREDENTIAL@]URL",
                                                   help="With --webrtc: a STUN (stun:host:port) or TURN "
                                                   "(user:secret@turn:host:port) server, repeatable; default: "
                                                   "host candidates only. The page is told the STUN ones."),
    use_ray: bool = typer.Option(False, "--ray", help="Scale out on Ray Serve: --replicas worker processes, each "
                                 "with its own GPU(s) and --max-sessions sessions, behind Ray's proxy on "
                                 "--host/--port (README, \"Scale-out on Ray Serve\"). Needs the ray extra."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="With --ray: replicas (GPU worker processes)."),
    gpus_per_replica: Optional[int] = typer.Option(None, "--gpus-per-replica", min=0, max=2, help="With --ray: 1 "
                                                   "(DiT and decoders on one GPU) or 2 (decoders on the second); 0 "
                                                   "for CPU. Default: 1 with --device cuda, 0 with cpu."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running cluster (auto, or "
                                              "ray://head:10001); default: start Ray on this machine."),
):
    """Serve live sessions: a page at / that plays the stream as it is generated (prompt switching
    included) and the WebSocket protocol behind it (README, "Live sessions"). Needs the serve extra."""
    from hallolive_rt.runtime.serve.launch import RAY_EXTRA_HINT, SERVE_EXTRA_HINT, missing_ray_deps, missing_serve_deps

    if not use_ray and (replicas != 1 or gpus_per_replica is not None or ray_address is not None):
        _fail("--replicas, --gpus-per-replica and --ray-address go with --ray")
    if use_ray and webrtc:
        _fail("--webrtc serves from one process; with --ray use the WebSocket transport")
    if use_ray and missing_ray_deps():
        _fail(f"{', '.join(missing_ray_deps())} not installed: {RAY_EXTRA_HINT}")
    if missing_serve_deps():
        _fail(f"{', '.join(missing_serve_deps())} not installed: {SERVE_EXTRA_HINT}", 3)
    if webrtc:
        from hallolive_rt.runtime.serve.webrtc import WEBRTC_EXTRA_HINT, webrtc_available

        if not webrtc_available():
            _fail(f"--webrtc needs aiortc, which is not installed: {WEBRTC_EXTRA_HINT}", 3)
    from hallolive_rt.runtime.serve.launch import serve_main
    from hallolive_rt.runtime.serve.protocol import Limits

    try:
        model = _model(preset, model_dir, random_weights, seed, ema, dtype, device, vae_device)
        dit = _dit(backend, artifacts, kv_impl, "auto", fuse_projections, attn_kernel, precision, fp8_act_scale,
                   lean_context)
        decoders = _decoders(video_decoder, tiny_decoder_weights, vae_backend, vae_channels_last, overlap)
        serving = o.ServeOptions(host=host, port=port, token=token, allowed_origins=tuple(allow_origin or ()),
                                 max_sessions=max_sessions, log_level=log_level, webrtc=webrtc,
                                 ice_servers=tuple(ice_server or ()))
        limits = Limits(max_prompt_chars=max_prompt_chars, max_blocks=max_blocks,
                        max_unacked_blocks=max_unacked_blocks, client_timeout_s=client_timeout,
                        block_timeout_s=block_timeout)
        if use_ray:
            from hallolive_rt.runtime.serve.ray import args_from_cli, serve_ray_main

            serve_ray_main(args_from_cli(model=model, dit=dit, decoders=decoders, max_sessions=max_sessions,
                                         gpus_per_replica=gpus_per_replica, replicas=replicas, limits=limits,
                                         token=token, allowed_origins=serving.allowed_origins),
                           host=host, port=port, address=ray_address,
                           on_ready=lambda url: typer.echo(f"live sessions (Ray Serve) at {url}", err=True))
            return
        serve_main(serving, limits=limits, model=model, dit=dit, decoders=decoders,
                   on_ready=lambda url: typer.echo(f"live sessions at {url}", err=True))
    except InputError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        pass


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    session: str = typer.Option("torch", "--session", help="nsys (Nsight Systems), ncu (Nsight Compute) or torch "
                                "(the PyTorch profiler: needs nothing installed)."),
    target: Optional[str] = typer.Option(None, "--target", help="--session ncu only: the kernel target from "
                                         "profiles/ncu.toml (dit, attention, gemm, context, vae, audio); default: "
                                         "the preset's."),
    out_dir: Path = typer.Option(Path("profile-out"), "--out-dir", help="Folder of the session's outputs (trace or "
                                 "report, and the stream's MP4 unless --out is given); created if missing."),
    warmup_runs: Optional[int] = typer.Option(None, "--warmup-runs", min=0, help="Streams run (unrecorded) before "
                                              "the profiled one, for graph capture and autotuning. Default: 1 "
                                              "(torch), the preset's (nsys, ncu)."),
):
    """Run `stream` under Nsight Systems / Nsight Compute, or the PyTorch profiler (`--session torch`).

    Every other option is passed to `hallolive-rt stream` (e.g. --preset tiny --blocks 2) and checked
    before anything runs. The stream writes into --out-dir unless given --out (an existing file is then
    refused without --overwrite). The torch session decodes inline (--no-overlap) unless told otherwise:
    its profiler records one thread."""
    from typer.main import get_command

    from hallolive_rt.runtime.profile_run import profile_stream

    stream_cmd = get_command(app).commands["stream"]
    try:
        result = profile_stream(session, list(ctx.args), out_dir, target=target, warmup_runs=warmup_runs,
                                          parse=lambda args: stream_cmd.make_context("stream", list(args)),
                                          run=lambda args: get_command(app).main(["stream", *args],
                                                                                  standalone_mode=False))
    except InputError as e:
        _fail(str(e), getattr(e, "exit_code", 2))
    for line in result.lines:
        typer.echo(line)
    raise typer.Exit(result.exit_code)


if __name__ == "__main__":
    app()
