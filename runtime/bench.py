"""``hallolive-rt bench``: N blocks per backend in one process, a table, and a JSON under bench/results/.

    bench_main("hallolive-512x992", random_weights=True, backends=["eager", "cudagraph"], blocks=5,
               mode="e2e", out_json="bench/results/h100-e2e.json", device="cuda")

Modes (all start from an already-encoded prompt: a fixed random context, never zeros):
  e2e  the full session (DiT + video/audio decode + D2H, overlapped as ``stream`` runs it), per backend;
  dit  the DiT block loop only (4 steps + context pass per block), per backend;
  vae  the decoders only (video VAE frame by frame + streamed audio), on random latents.
Every mode reports DiT-only / VAE-only FPS-equivalents where it measures them, and the two-device
throughput min(DiT-only, VAE-only) labelled ``projected``. Per-stage achieved TFLOP/s use FLOP counts of
the real architecture at the profile's shapes (runtime/flops.py: counted once on CPU on the meta device
and committed, 33.4 -> 48.8 TFLOP per DiT forward and 37.4 TFLOP per latent frame of the video VAE at
512x992, as docs/FACTS.md section 7 states; never recounted on the GPU unless the committed table is stale).
One warm-up stream per backend precedes the timed one (graph capture and autotuning stay out of the
numbers). Weights are built on the device (``load_components(profile, None, ...)``): no weight ever passes
through host RAM; ``components=`` reuses a set already built (one build for several modes).

Results are emitted as they come: after every timed block, ``on_update(out)`` gets the JSON so far
(``complete`` False until the end) and ``out_json`` is rewritten (atomically), so a run killed part-way
keeps every finished block. Writing costs well under a millisecond per block, between blocks.

The DiT's opt-in fast paths (``fuse_projections``, ``attn_kernel``: ``--fuse-projections``,
``--attn-kernel``) apply to every backend of the run and are recorded at the top of the JSON and in each
result's ``session``: compare runs that differ only in them to decide whether they pay. The speed levers
of issue #15 (``levers=DiTLevers(...)``: ``--precision fp8``, ``--lean-context``; and the ``compiled``
backend) are recorded the same way (``levers`` at the top, fp8 / compile details in each ``session``).

The video decoder's opt-in fast paths (``vae_backend``, ``vae_channels_last``: ``--vae-backend
eager,cudagraph+cl3d ...``, runtime/vae_runner.py) are run variants: ``--mode vae`` runs each in this
process after the eager baseline (keys ``"<variant> (decoders)"``, ``ratios_vs_eager`` on the VAE-only
rate); e2e runs every DiT backend with every listed variant (keys ``"<backend> vae=<variant>"`` except the
eager decoder). ``compare_overlap`` (``--compare-overlap``) runs each e2e variant overlapped and sequential
(keys ``"... no-overlap"``). The choices are recorded at the top of the JSON and in each ``session``.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hallolive_rt.profile import Profile, load_profile

from .flops import FlopCounts, count_flops
from .metrics import achieved_tflops, emitter, env_info, percentile, stream_metrics

__all__ = ["bench_main", "FlopCounts", "count_flops", "combine_projection", "MODES", "dit_blocks"]

MODES = ("e2e", "dit", "vae")
BF16_PEAK_TFLOPS = 790.0  # dense bf16 peak assumed for H100/H200 (docs/MEASURE.md, stage_tflops)


# ---- the runs: generators of DecodedBlocks, one per block as it finishes --------------------------------

def _random_ctx(profile: Profile, device, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 99)
    return (0.5 * torch.randn(1, profile.text.text_len, profile.text.text_dim, generator=g, device=device)).to(dtype)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def dit_blocks(sess, ctx, seed: int, latents: list | None = None) -> Iterator:
    """The session's DiT loop without decoding: one DecodedBlock (DiT stage times only, no frames) per
    block, as soon as its DiT work is done. ``latents`` collects each block's committed (video, audio)
    latents as float32 CPU tensors (for comparisons between backends)."""
    import numpy as np

    from hallolive_rt.sampler import TorchNoise
    from hallolive_rt.stream import window_noise

    from .clock import dit_ms
    from .decode_pipeline import DecodedBlock
    from .session import BlockNoise

    c, p, bs, clock = sess.c, sess.p, sess.bs, sess.pipeline.clock
    init, fresh = BlockNoise(p, seed, c.dit_device, c.dtype), TorchNoise(seed + 1, device=c.dit_device)
    clock.start()
    with sess._on_dit_device(), torch.no_grad():
        bs.start(ctx)
    for plan in sess.plans:
        with sess._on_dit_device(), torch.no_grad():
            win = window_noise(init.audio, plan.index, sess.blocks, p.stream.audio_tokens_per_block,
                               p.audio_window)
            sess._k, sess._marks = 0, {"steps": []}
            m = sess._marks
            m["dit_start"] = clock.mark()
            out = bs.run_block(plan, init.video(plan.index), win, fresh)
            m["dit_end"] = clock.mark()
            init.drop_before(plan.index + 1)
            if latents is not None:
                latents.append((out.video.float().cpu(), out.audio.float().cpu()))
        e = clock.at_s(m["dit_end"], c.dit_device)  # waits for this block only (event-timed stages)
        t = {"dit": dit_ms(clock, m),
             "dit_steps": sum(clock.ms(a, b) for a, b in m["steps"]), "dit_context": clock.ms(*m["context"])}
        frames = p.pixel_frames(p.stream.latent_frames_per_block, first_block=plan.index == 0)
        yield DecodedBlock(plan.index, np.zeros((frames, 0, 0, 3), np.uint8), np.zeros(0, np.float32), t,
                           clock.at_s(m["dit_start"], c.dit_device), e, e, [e])


def _vae_blocks(comps, profile: Profile, blocks: int, seed: int, pipe=None) -> Iterator:
    """Decode random latents block by block (sequential, exact stage times), one DecodedBlock each, with
    ``pipe`` (a sequential DecodePipeline, built once per video runner variant: its capture/compile happens
    at construction)."""
    from types import SimpleNamespace

    from .decode_pipeline import DecodePipeline

    pipe = pipe or DecodePipeline(comps, profile, overlap=False)
    s, v = profile.stream, profile.video
    dev, dt = comps.vae_device, comps.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    pipe.start()
    for i in range(blocks):
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            r = lambda *sh: torch.randn(sh, generator=g, device=dev).to(dt)  # noqa: E731
            out = SimpleNamespace(index=i, video=r(1, s.latent_frames_per_block, v.latent_channels,
                                                   v.latent_height, v.latent_width),
                                  audio=r(1, s.audio_tokens_per_block, profile.audio.latent_channels),
                                  audio_future=r(1, s.future_audio_tokens, profile.audio.latent_channels))
            m = pipe.clock.mark()
            pipe.submit(out, {"dit_start": m, "dit_end": m, "steps": [], "context": (m, m)})  # decodes inline
        for b in pipe.ready() + (pipe.finish() if i + 1 == blocks else []):
            for k in ("dit", "dit_steps", "dit_context"):
                b.times.pop(k, None)
            yield b


def _stage_tflops(blocks, flops: list[dict[str, int]], measured_peak: float | None = None) -> dict:
    """Median achieved TFLOP/s per stage over steady blocks (all blocks if only one), as a share of the
    assumed bf16 peak and of the GEMM peak measured in this process (runtime/peak.py)."""
    ref = blocks[1:] or blocks
    out = {}
    for stage_name in ("dit", "dit_steps", "dit_context", "vae_video", "vae_audio"):
        vals = [achieved_tflops(flops[b.index][stage_name], b.times.get(stage_name)) for b in ref
                if b.times.get(stage_name)]
        med = percentile([x for x in vals if x is not None], 50)
        out[stage_name] = {"tflops": med, "share_of_bf16_peak": med / BF16_PEAK_TFLOPS if med else None,
                           "share_of_measured_peak": med / measured_peak if med and measured_peak else None}
    return out


def _result(got, mode: str, prof: Profile, dit_dev, vae_dev, flops, sess_info: dict,
            measured_peak: float | None = None) -> dict:
    """The metrics of one backend's timed run (so far)."""
    m = stream_metrics(got, fps=prof.fps, device=str(dit_dev), dtype=prof.dtype_name, with_env=False)
    if mode != "e2e":  # only one stage ran: the stream-level figures do not exist
        for k in ("ttff_s", "steady_fps", "steady_wall_s", "block_time_s", "inter_block_gap_s"):
            m[k] = None
        m["projected_two_device_fps"]["value"] = None
    m["stage_tflops"] = _stage_tflops(got, flops, measured_peak)
    m["session"] = sess_info
    if dit_dev.type == "cuda":
        m["peak_memory_gib"] = {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in {dit_dev, vae_dev}}
    return m


def _command(preset, backends, n, mode, device, vae_device, prof, random_weights, fuse_projections,
             attn_kernel, kv_impl, vae_backend, vae_channels_last, overlap, compare_overlap, levers) -> str:
    if "bench" in " ".join(sys.argv[:2]):
        return "hallolive-rt bench " + " ".join(sys.argv[2:])
    return (f"bench_main(preset={preset!r}, backends={backends}, blocks={n}, mode={mode!r}, device={device!r}, "
            f"vae_device={vae_device!r}, dtype={prof.dtype_name!r}, random_weights={random_weights}, "
            f"kv_impl={kv_impl!r}, fuse_projections={fuse_projections}, attn_kernel={attn_kernel!r}, "
            f"vae_backend={vae_backend!r}, vae_channels_last={vae_channels_last}, overlap={overlap}, "
            f"compare_overlap={compare_overlap}, levers={levers!r})")


def bench_main(preset: str = "hallolive-512x992", random_weights: bool = True, backends: list[str] | None = None,
               blocks: int | None = None, mode: str = "e2e", out_json: str | Path | None = None, *,
               device: str = "cuda", vae_device: str | None = None, dtype: str | None = None,
               model_dir: str | None = None, seed: int = 0, kv_impl: str = "torch", warmup_runs: int = 1,
               overlap: bool = True, fuse_projections: bool = False, attn_kernel: str = "auto",
               vae_backend: str = "eager", vae_channels_last: bool = False, compare_overlap: bool = False,
               console=None, ema: bool = False, components=None,
               on_update: Callable[[dict], None] | None = None, levers=None, artifacts: str | None = None) -> dict:
    """Run the benchmark; print a table; write ``out_json`` (if given, after every block); return the JSON.

    ``components``: models already built for this preset and dtype (their devices are used); ``on_update``:
    called with the JSON so far after every timed block and once at the end (``complete`` True).
    ``backends`` None: every backend that can run here (``default_backends``). ``artifacts``: the export
    directory the aoti / tensorrt backends run from, checked before any weight is built."""
    from rich.console import Console
    from rich.table import Table

    from hallolive_rt import nvtx
    from hallolive_rt.cache_policy import choose_policy
    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.kvcache.build import require_kv_ext

    from .components import load_components, weights_nbytes
    from .decode_pipeline import DecodePipeline
    from .placement import resolve_devices
    from .levers import DiTLevers, check_levers, precision_dtype
    from .peak import measure_gemm_peak
    from .session import StreamSession, check_fast_paths
    from .vae_runner import check_vae_options, parse_vae_variants

    console = console or Console(stderr=True, width=200)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not random_weights and model_dir is None and components is None:
        raise ValueError("bench needs --random-weights or --model-dir")
    levers = levers or DiTLevers()
    # released geometry: the policy depends on it; --precision bf16|fp16|fp32 name the --dtype
    prof = load_profile(preset).with_overrides(dtype=precision_dtype(levers.precision, dtype))
    n = blocks if blocks is not None else prof.stream.blocks
    if components is not None:
        if (components.profile.name, components.dtype) != (prof.name, prof.dtype):
            raise ValueError(f"components were built for {components.profile.name} {components.dtype}, "
                             f"not {prof.name} {prof.dtype}")
        dit_dev, vae_dev = components.dit_device, components.vae_device
    else:
        dit_dev, vae_dev = resolve_devices(device, vae_device)
    backends = list(backends) if backends else default_backends(dit_dev, artifacts, console)
    vae_variants = parse_vae_variants(vae_backend, vae_channels_last)
    runs = _run_variants(mode, backends, vae_variants, [True, False] if compare_overlap else [overlap])
    cfg = load_fusion_config(prof.video_config, prof.audio_config)
    names = list(dict.fromkeys(r[1] for r in runs))
    backend_for = _check_backends(names, prof, n, dit_dev, artifacts, model_dir if not random_weights else None,
                                  seed, ema)
    for name in names:  # before building anything: a choice that cannot run fails now, naming itself
        check_fast_paths(name, fuse_projections, attn_kernel, dit_dev, prof.dtype, cfg)
        if mode != "vae":
            check_levers(name, levers, prof.dtype)
    for vo in vae_variants:
        check_vae_options(vo, vae_dev)
    kv_ext = require_kv_ext(kv_impl, dit_dev) if mode != "vae" else None  # built before any weight
    t = time.perf_counter()
    comps = components or load_components(prof, None if random_weights else model_dir, dit_device=dit_dev,
                                           vae_device=vae_dev, dtype=prof.dtype, seed=seed, with_text=False,
                                           ema=ema)
    _sync(dit_dev)
    build_s = time.perf_counter() - t
    peak = measure_gemm_peak(dit_dev, prof.dtype)  # the card at hand, in this process (~0.1 s)
    ctx = _random_ctx(prof, dit_dev, prof.dtype, seed)
    counts = FlopCounts(prof, lean_context=levers.lean_context)
    flops = count_flops(prof, list(choose_policy(prof, n).plans()), len(prof.stream.denoising_steps), counts)
    results: dict[str, dict] = {}
    out = {
        "command": _command(preset, backends, n, mode, device, vae_device, prof, random_weights,
                            fuse_projections, attn_kernel, kv_impl, vae_backend, vae_channels_last, overlap,
                            compare_overlap, levers),
        "complete": False, "mode": mode, "preset": prof.name, "blocks": n, "dtype": prof.dtype_name,
        "kv_impl": kv_impl, "kv_ext": kv_ext, "fuse_projections": fuse_projections, "attn_kernel": attn_kernel,
        "levers": levers.to_dict(), "vae_variants": [vo.label for vo in vae_variants], "overlap": "both" if compare_overlap else overlap,
        "weights": comps.source, "weights_bytes": weights_nbytes(comps),
        "build_s": build_s if components is None else None, "dit_device": str(dit_dev), "vae_device": str(vae_dev),
        "shapes": prof.to_dict(), "flops_per_block": flops, "flops": counts.describe(),
        "bf16_peak_tflops_assumed": BF16_PEAK_TFLOPS, "gemm_peak_measured": peak, "nvtx": nvtx.describe(),
        "env": env_info([dit_dev, vae_dev]), "results": results, "projected": None,
    }
    out["git_commit"] = out["env"]["git_commit"]

    emit = emitter(out, on_update, out_json)

    for key, name, vae_opts, ov in runs:
        if dit_dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            for d in {dit_dev, vae_dev}:
                torch.cuda.reset_peak_memory_stats(d)
        if mode == "vae":
            sess = pipe = DecodePipeline(comps, prof, overlap=False, video_runner=vae_opts)
            sess_info = {"backend": key, **pipe.describe()}
            for _ in range(warmup_runs):
                list(_vae_blocks(comps, prof, min(n, 2), seed, pipe))
            timed = _vae_blocks(comps, prof, n, seed, pipe)
        else:
            sess = StreamSession(comps, prof, backend=backend_for(name), blocks=n, kv_impl=kv_impl, overlap=ov,
                                 fuse_projections=fuse_projections, attn_kernel=attn_kernel, video_runner=vae_opts,
                                 levers=levers)
            sess_info = sess.describe()
            for _ in range(warmup_runs):
                list(sess.run(ctx, seed) if mode == "e2e" else dit_blocks(sess, ctx, seed))
            timed = sess.run(ctx, seed) if mode == "e2e" else dit_blocks(sess, ctx, seed)
        got = []
        for blk in timed:
            got.append(blk)
            results[key] = _result(got, mode, prof, dit_dev, vae_dev, flops, sess_info, peak["tflops"])
            emit()
        del sess, timed
    out["complete"] = True
    base = "eager (decoders)" if mode == "vae" else "eager"
    if len(results) > 1 and base in results:
        key = {"e2e": "steady_fps", "dit": "dit_only_fps_equiv", "vae": "vae_only_fps_equiv"}[mode]
        out["ratios_vs_eager"] = {k: (r[key] / results[base][key]) if r[key] and results[base][key] else None
                                  for k, r in results.items()}
        out["ratios_metric"] = key
    out["projected"] = _projection(results, mode)
    emit()
    _table(console, Table, out)
    return out


def _run_variants(mode: str, backends: list[str], vae_variants: list, overlaps: list[bool]) -> list[tuple]:
    """(result key, DiT backend, video runner options, overlap) per run, baselines first.

    vae: the eager decoder first (the ratios' baseline), then each listed variant; dit: the decoders do
    not run, so one run per DiT backend; e2e: every DiT backend x video variant x overlap setting.
    """
    from .vae_runner import VideoDecodeOptions

    if mode == "vae":
        vs = list(dict.fromkeys([VideoDecodeOptions(), *vae_variants]))
        return [(f"{vo.label} (decoders)", "eager", vo, False) for vo in vs]
    if mode == "dit":
        return [(b, b, VideoDecodeOptions(), overlaps[0]) for b in backends]
    return [(b + ("" if vo.label == "eager" else f" vae={vo.label}") + ("" if ov or len(overlaps) == 1 else
             " no-overlap"), b, vo, ov) for b in backends for vo in vae_variants for ov in overlaps]


def default_backends(dit_dev: torch.device, artifacts: str | None, console=None) -> list[str]:
    """The backends ``--backends`` means when not given: eager everywhere, cudagraph on CUDA, and the
    format of ``artifacts`` (aoti / tensorrt) when a directory is given; says which were left out."""
    import json

    names = ["eager"] + (["cudagraph"] if dit_dev.type == "cuda" else [])
    if artifacts is not None:
        try:
            fmt = json.loads((Path(artifacts) / "manifest.json").read_text()).get("format")
        except (OSError, ValueError):
            fmt = None  # the artifact check names what is wrong with the directory
        names.append(fmt if fmt in ("aoti", "tensorrt") else "aoti")
    if dit_dev.type != "cuda" and console is not None:
        console.print(f"backends: {', '.join(names)} (cudagraph needs a CUDA device: not run on {dit_dev})")
    return names


def _check_backends(names: list[str], prof: Profile, blocks: int, dit_dev: torch.device,
                    artifacts: str | None, model_dir: str | None, seed: int, ema: bool = False):
    """Show every backend of ``names`` able to run this bench before any weight is built (the compiled ones
    against their artifact directory; a refusal names --backends); returns ``backend_for(name)``: the
    checked object for a backend's first run, a fresh one for each later run (a backend is prepared once)."""
    from hallolive_rt.cache_policy import choose_policy, variant_plans
    from hallolive_rt.export.manifest import ArtifactMismatch

    from .backends import BACKENDS, BackendUnavailable
    from .backends.artifacts import ArtifactBackend, backend_for_run
    from .backends.cudagraph import require_cuda

    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise ValueError(f"--backends {','.join(unknown)}: unknown; choose from {', '.join(BACKENDS)}")
    policy = choose_policy(prof, blocks)
    out = {}
    for name in names:
        try:
            if name in ("cudagraph", "compiled"):  # CUDA graphs: the message names this command's flag
                require_cuda(dit_dev, what=f"{name} backend", flag="--backends")
            be = backend_for_run(name, artifacts if name in ("aoti", "tensorrt") else None,
                                 model_dir=model_dir, seed=seed, ema=ema, flag="--backends")
            if isinstance(be, ArtifactBackend):
                be.check(prof, policy.layout(), {p.variant for p in variant_plans(policy)}, dit_dev, prof.dtype)
        except (BackendUnavailable, ArtifactMismatch, FileNotFoundError) as e:
            raise ValueError(f"--backends {name} cannot run here: {e}") from None
        out[name] = be

    def backend_for(name: str):
        be = out.pop(name, None)
        return be if be is not None else backend_for_run(name, artifacts if name in ("aoti", "tensorrt") else None,
                                                         model_dir=model_dir, seed=seed, ema=ema, flag="--backends")
    return backend_for


def _projection(results: dict, mode: str) -> dict:
    """Two-device throughput from the stages measured: min(DiT-only, VAE-only) FPS-equivalents."""
    dit = max((r["dit_only_fps_equiv"] or 0 for r in results.values()), default=0) if mode != "vae" else None
    vae = max((r["vae_only_fps_equiv"] or 0 for r in results.values()), default=0) if mode != "dit" else None
    val = min(dit, vae) if dit and vae else None
    return {"label": "projected (not measured): DiT on one device, decoders on another; min of the two "
                     "stages' FPS-equivalents (best backend); combine a dit-mode and a vae-mode JSON when "
                     "each was run alone", "dit_only_fps_equiv": dit, "vae_only_fps_equiv": vae,
            "two_device_fps": val}


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _table(console, Table, out: dict) -> None:
    t = Table(title=f"hallolive-rt bench: {out['preset']} {out['mode']} x{out['blocks']} blocks "
                    f"({out['dtype']}, {out['dit_device']}/{out['vae_device']}, fused projections "
                    f"{'on' if out['fuse_projections'] else 'off'}, attention kernel {out['attn_kernel']})")
    for col in ("backend", "TTFF s", "steady FPS", "block s (med)", "DiT ms", "VAE ms", "DiT FPS-eq",
                "VAE FPS-eq", "DiT TFLOP/s", "VAE TFLOP/s", "peak GiB"):
        t.add_column(col, justify="right")
    for name, r in out["results"].items():
        sm, tf = r["stage_ms_median"], r["stage_tflops"]
        vae_ms = (sm.get("vae_video") or 0) + (sm.get("vae_audio") or 0) or None
        peak = max(r.get("peak_memory_gib", {}).values(), default=None)
        t.add_row(name, _fmt(r["ttff_s"], ".3f"), _fmt(r["steady_fps"]),
                  _fmt((r["block_time_s"] or {}).get("median"), ".3f"), _fmt(sm.get("dit"), ".1f"),
                  _fmt(vae_ms, ".1f"), _fmt(r["dit_only_fps_equiv"]), _fmt(r["vae_only_fps_equiv"]),
                  _fmt(tf["dit"]["tflops"], ".3g"), _fmt(tf["vae_video"]["tflops"], ".3g"), _fmt(peak, ".1f"))
    console.print(t)
    pr = out["projected"]
    console.print(f"projected two-device FPS (not measured): {_fmt(pr['two_device_fps'])}")


def combine_projection(dit_json: str | Path | dict, vae_json: str | Path | dict) -> dict:
    """Two-device projection from a ``--mode dit`` and a ``--mode vae`` result (files or dicts)."""
    import json

    def load(x):
        return x if isinstance(x, dict) else json.loads(Path(x).read_text())

    d, v = load(dit_json), load(vae_json)
    if d["mode"] != "dit" or v["mode"] != "vae":
        raise ValueError(f"need a dit-mode and a vae-mode result, got {d['mode']} and {v['mode']}")
    dit = max((r["dit_only_fps_equiv"] or 0) for r in d["results"].values())
    vae = max((r["vae_only_fps_equiv"] or 0) for r in v["results"].values())
    return {"label": "projected (not measured): min(DiT-only, VAE-only FPS-equivalent)", "dit_only_fps_equiv": dit,
            "vae_only_fps_equiv": vae, "two_device_fps": min(dit, vae) if dit and vae else None}
