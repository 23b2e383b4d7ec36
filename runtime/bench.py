"""``hallolive-rt bench``: N blocks per backend in one process, a table, and a JSON under bench/results/.

    bench_main("hallolive-512x992", random_weights=True, backends=["eager", "cudagraph"], blocks=5,
               mode="e2e", out_json="bench/results/h100-e2e.json", device="cuda")

Modes (all start from an already-encoded prompt: a fixed random context, never zeros):
  e2e  the full session (DiT + video/audio decode + D2H, overlapped as ``stream`` runs it), per backend;
  dit  the DiT block loop only (4 steps + context pass per block), per backend;
  vae  the decoders only (video VAE frame by frame + streamed audio), on random latents.
Every mode reports DiT-only / VAE-only FPS-equivalents where it measures them, and the two-device
throughput min(DiT-only, VAE-only) labelled ``projected``. Per-stage achieved TFLOP/s use FLOP counts of
the real architecture at the profile's shapes, counted with ``torch.utils.flop_counter`` on the meta
device (no weights, no compute): 33.4 -> 48.8 TFLOP per DiT forward and 37.4 TFLOP per latent frame of
the video VAE at 512x992, as docs/FACTS.md section 7 states. One warm-up stream per backend precedes the
timed one (graph capture and autotuning stay out of the numbers). Weights are built on the device
(``load_components(profile, None, ...)``): no weight ever passes through host RAM.

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
from functools import lru_cache
from pathlib import Path

import torch

from hallolive_rt.profile import Profile, load_profile

from .metrics import achieved_tflops, env_info, percentile, stream_metrics, write_json

__all__ = ["bench_main", "FlopCounts", "count_flops", "combine_projection", "MODES"]

MODES = ("e2e", "dit", "vae")
BF16_PEAK_TFLOPS = 790.0  # dense bf16 peak assumed for H100/H200 (docs/MEASURE.md, stage_tflops)


# ---- FLOP counts from the architecture at the profile's shapes (meta device) -----------------------------

@lru_cache(maxsize=None)
def _dit_forward_flops(profile: Profile, audio_len: int, kv_len: int, context: bool = False) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.model.dit import DualStreamDiT
    from hallolive_rt.state import CacheLayout, DiTState
    from hallolive_rt.stream import Cursor

    cfg = load_fusion_config(profile.video_config, profile.audio_config)
    with torch.device("meta"):
        dit = DualStreamDiT(cfg).to(profile.dtype)
    dit.reset_rope()
    st = DiTState.allocate(cfg, profile, CacheLayout(slots=kv_len), device="meta", dtype=profile.dtype)
    s, v = profile.stream, profile.video
    cur = Cursor("meta")
    xv = torch.empty(s.batch, s.latent_frames_per_block, v.latent_channels, v.latent_height, v.latent_width,
                     device="meta", dtype=profile.dtype)
    xa = torch.empty(s.batch, audio_len, profile.audio.latent_channels, device="meta", dtype=profile.dtype)
    vt = torch.empty(s.batch, s.latent_frames_per_block, device="meta")
    at = torch.empty(s.batch, audio_len, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        dit(xv, xa, vt, at, st, cur.positions(s.latent_frames_per_block, audio_len), kv_len, context=context)
    return int(fc.get_total_flops())


@lru_cache(maxsize=None)
def _vae_frame_flops(profile: Profile, first: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from .components import decoder_configs
    from hallolive_rt.model.vae_video import build_video_decoder

    vcfg = decoder_configs(profile)[0]
    vd = build_video_decoder(vcfg, device="meta")
    v = profile.video
    st = vd.new_state(1, v.latent_height, v.latent_width, dtype=torch.float32, device="meta")
    z = torch.empty(1, v.latent_channels, 1, v.latent_height, v.latent_width, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vd.decode_frame(z, st, first)
    return int(fc.get_total_flops())


@lru_cache(maxsize=None)
def _audio_window_flops(profile: Profile, tokens: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from .components import decoder_configs
    from hallolive_rt.model.vae_audio import AudioVAEDecoder
    from hallolive_rt.model.vocoder import BigVGANVocoder

    _, acfg, gcfg, _ = decoder_configs(profile)
    with torch.device("meta"):
        vae, voc = AudioVAEDecoder(acfg), BigVGANVocoder(gcfg)
    z = torch.empty(1, acfg.embed_dim, tokens, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        voc(vae(z))
    return int(fc.get_total_flops())


class FlopCounts:
    """FLOPs per block and stage for ``profile`` (counted once per static shape, cached)."""

    def __init__(self, profile: Profile, lean_context: bool = False):
        self.p = profile
        self.lean_context = lean_context  # the context pass counts only the lean forward's work

    def dit_forward(self, plan, context: bool = False) -> int:
        return _dit_forward_flops(self.p, plan.audio_len, plan.video_kv_len, context)

    def dit_block(self, plan, steps: int) -> dict[str, int]:
        f, c = self.dit_forward(plan), self.dit_forward(plan, self.lean_context)
        return {"dit_steps": steps * f, "dit_context": c, "dit": steps * f + c}

    def vae_video_block(self, first_block: bool) -> int:
        n = self.p.stream.latent_frames_per_block
        if first_block:
            return _vae_frame_flops(self.p, True) + (n - 1) * _vae_frame_flops(self.p, False)
        return n * _vae_frame_flops(self.p, False)

    def vae_audio_block(self, index: int) -> int:
        s, left = self.p.stream, self.p.audio.stream_left_context
        have = min(index * s.audio_tokens_per_block, left)  # the streamed window ("trim" start)
        return _audio_window_flops(self.p, have + s.audio_tokens_per_block + s.future_audio_tokens)


def count_flops(profile: Profile, plans, steps: int, lean_context: bool = False) -> list[dict[str, int]]:
    """Per block: FLOPs of dit, dit_steps, dit_context (the lean pass's if ``lean_context``), vae_video, vae_audio."""
    fc = FlopCounts(profile, lean_context)
    return [{**fc.dit_block(pl, steps), "vae_video": fc.vae_video_block(pl.index == 0),
             "vae_audio": fc.vae_audio_block(pl.index)} for pl in plans]


# ---- the runs ------------------------------------------------------------------------------------------

def _random_ctx(profile: Profile, device, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 99)
    return (0.5 * torch.randn(1, profile.text.text_len, profile.text.text_dim, generator=g, device=device)).to(dtype)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _dit_only(sess, ctx, seed: int):
    """The session's DiT loop without decoding; returns fake DecodedBlocks with DiT stage times only."""
    import numpy as np

    from .devices import DecodedBlock
    from .session import BlockNoise
    from hallolive_rt.sampler import TorchNoise
    from hallolive_rt.stream import window_noise

    c, p, bs, clock = sess.c, sess.p, sess.bs, sess.pipeline.clock
    init, fresh = BlockNoise(p, seed, c.dit_device, c.dtype), TorchNoise(seed + 1, device=c.dit_device)
    clock.start()
    marks = []
    with sess._on_dit_device(), torch.no_grad():
        bs.start(ctx)
        for plan in sess.plans:
            win = window_noise(init.audio, plan.index, sess.blocks, p.stream.audio_tokens_per_block,
                               p.audio_window)
            sess._k, sess._marks = 0, {"steps": []}
            sess._marks["dit_start"] = clock.mark()
            bs.run_block(plan, init.video(plan.index), win, fresh)
            sess._marks["dit_end"] = clock.mark()
            marks.append(sess._marks)
    _sync(c.dit_device)
    out = []
    fpb = [p.pixel_frames(p.stream.latent_frames_per_block, first_block=i == 0) for i in range(len(marks))]
    for i, m in enumerate(marks):
        t = {"dit": clock.ms(m["dit_start"], m["dit_end"]),
             "dit_steps": sum(clock.ms(a, b) for a, b in m["steps"]), "dit_context": clock.ms(*m["context"])}
        e = clock.at_s(m["dit_end"], c.dit_device)
        out.append(DecodedBlock(i, np.zeros((fpb[i], 0, 0, 3), np.uint8), np.zeros(0, np.float32), t,
                                clock.at_s(m["dit_start"], c.dit_device), e, e, [e]))
    return out


def _vae_only(comps, profile: Profile, blocks: int, seed: int, pipe=None):
    """Decode random latents block by block (sequential, exact stage times) with ``pipe`` (a sequential
    DecodePipeline, built once per video runner variant: its capture/compile happens at construction)."""
    from types import SimpleNamespace

    from .devices import DecodePipeline

    pipe = pipe or DecodePipeline(comps, profile, overlap=False)
    s, v = profile.stream, profile.video
    dev, dt = comps.vae_device, comps.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    pipe.start()
    got = []
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for i in range(blocks):
            r = lambda *sh: torch.randn(sh, generator=g, device=dev).to(dt)  # noqa: E731
            out = SimpleNamespace(index=i, video=r(1, s.latent_frames_per_block, v.latent_channels,
                                                   v.latent_height, v.latent_width),
                                  audio=r(1, s.audio_tokens_per_block, profile.audio.latent_channels),
                                  audio_future=r(1, s.future_audio_tokens, profile.audio.latent_channels))
            m = pipe.clock.mark()
            pipe.submit(out, {"dit_start": m, "dit_end": m, "steps": [], "context": (m, m)})
        got = pipe.finish()
    for b in got:
        for k in ("dit", "dit_steps", "dit_context"):
            b.times.pop(k, None)
    return got


def _stage_tflops(blocks, flops: list[dict[str, int]]) -> dict:
    """Median achieved TFLOP/s per stage over steady blocks (all blocks if only one)."""
    ref = blocks[1:] or blocks
    out = {}
    for stage_name in ("dit", "dit_steps", "dit_context", "vae_video", "vae_audio"):
        vals = [achieved_tflops(flops[b.index][stage_name], b.times.get(stage_name)) for b in ref
                if b.times.get(stage_name)]
        med = percentile([x for x in vals if x is not None], 50)
        out[stage_name] = {"tflops": med, "share_of_bf16_peak": med / BF16_PEAK_TFLOPS if med else None}
    return out


def bench_main(preset: str = "hallolive-512x992", random_weights: bool = True, backends: list[str] | None = None,
               blocks: int | None = None, mode: str = "e2e", out_json: str | Path | None = None, *,
               device: str = "cuda", vae_device: str | None = None, dtype: str | None = None,
               model_dir: str | None = None, seed: int = 0, kv_impl: str = "torch", warmup_runs: int = 1,
               overlap: bool = True, fuse_projections: bool = False, attn_kernel: str = "auto",
               vae_backend: str = "eager", vae_channels_last: bool = False, compare_overlap: bool = False,
               console=None, ema: bool = False, levers=None, artifacts: str | None = None) -> dict:
    """Run the benchmark; print a table; write ``out_json`` (if given); return the JSON dict.

    ``backends`` None: every backend that can run here (``default_backends``). ``artifacts``: the export
    directory the aoti / tensorrt backends run from, checked before any weight is built."""
    from rich.console import Console
    from rich.table import Table

    from hallolive_rt.config import load_fusion_config

    from .components import load_components, weights_nbytes
    from .devices import DecodePipeline, resolve_devices
    from .levers import DiTLevers, check_levers, precision_dtype
    from .session import StreamSession, check_fast_paths
    from .vae_runner import check_vae_options, parse_vae_variants

    console = console or Console(stderr=True, width=200)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not random_weights and model_dir is None:
        raise ValueError("bench needs --random-weights or --model-dir")
    levers = levers or DiTLevers()
    # released geometry: the policy depends on it; --precision bf16|fp16|fp32 name the --dtype
    prof = load_profile(preset).with_overrides(dtype=precision_dtype(levers.precision, dtype))
    n = blocks if blocks is not None else prof.stream.blocks
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
    t = time.perf_counter()
    comps = load_components(prof, None if random_weights else model_dir, dit_device=dit_dev,
                            vae_device=vae_dev, dtype=prof.dtype, seed=seed, with_text=False, ema=ema)
    _sync(dit_dev)
    build_s = time.perf_counter() - t
    ctx = _random_ctx(prof, dit_dev, prof.dtype, seed)
    results: dict[str, dict] = {}
    flops = None
    for key, name, vae_opts, ov in runs:
        if dit_dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            for d in {dit_dev, vae_dev}:
                torch.cuda.reset_peak_memory_stats(d)
        if mode == "vae":
            pipe = DecodePipeline(comps, prof, overlap=False, video_runner=vae_opts)
            for _ in range(warmup_runs):
                _vae_only(comps, prof, min(n, 2), seed, pipe)
            got, plans = _vae_only(comps, prof, n, seed, pipe), None
            sess_info = {"backend": key, **pipe.describe()}
            del pipe
        else:
            sess = StreamSession(comps, prof, backend=backend_for(name), blocks=n, kv_impl=kv_impl, overlap=ov,
                                 fuse_projections=fuse_projections, attn_kernel=attn_kernel, video_runner=vae_opts,
                                 levers=levers)
            plans = sess.plans
            for _ in range(warmup_runs):
                list(sess.run(ctx, seed)) if mode == "e2e" else _dit_only(sess, ctx, seed)
            got = list(sess.run(ctx, seed)) if mode == "e2e" else _dit_only(sess, ctx, seed)
            sess_info = sess.describe()
            del sess
        if flops is None:
            from hallolive_rt.cache_policy import choose_policy

            plans = plans or list(choose_policy(prof, n).plans())
            flops = count_flops(prof, plans, len(prof.stream.denoising_steps), lean_context=levers.lean_context)
        m = stream_metrics(got, fps=prof.fps, device=str(dit_dev), dtype=prof.dtype_name, with_env=False)
        if mode != "e2e":  # only one stage ran: the stream-level figures do not exist
            for k in ("ttff_s", "steady_fps", "steady_wall_s", "block_time_s", "inter_block_gap_s"):
                m[k] = None
            m["projected_two_device_fps"]["value"] = None
        m["stage_tflops"] = _stage_tflops(got, flops)
        m["session"] = sess_info
        if dit_dev.type == "cuda":
            m["peak_memory_gib"] = {str(d): torch.cuda.max_memory_allocated(d) / 2**30 for d in {dit_dev, vae_dev}}
        results[key] = m

    out = {
        "command": "hallolive-rt bench " + " ".join(sys.argv[2:]) if "bench" in " ".join(sys.argv) else
        f"bench_main(preset={preset!r}, backends={backends}, blocks={n}, mode={mode!r}, device={device!r}, "
        f"vae_device={vae_device!r}, dtype={prof.dtype_name!r}, random_weights={random_weights}, "
        f"fuse_projections={fuse_projections}, attn_kernel={attn_kernel!r}, vae_backend={vae_backend!r}, "
        f"vae_channels_last={vae_channels_last}, overlap={overlap}, compare_overlap={compare_overlap}, "
        f"levers={levers!r})",
        "mode": mode, "preset": prof.name, "blocks": n, "dtype": prof.dtype_name,
        "fuse_projections": fuse_projections, "attn_kernel": attn_kernel, "levers": levers.to_dict(),
        "vae_variants": [vo.label for vo in vae_variants], "overlap": "both" if compare_overlap else overlap,
        "weights": comps.source, "weights_bytes": weights_nbytes(comps), "build_s": build_s, "dit_device": str(dit_dev), "vae_device": str(vae_dev),
        "shapes": prof.to_dict(), "flops_per_block": flops, "bf16_peak_tflops_assumed": BF16_PEAK_TFLOPS,
        "env": env_info([dit_dev, vae_dev]), "results": results,
    }
    out["git_commit"] = out["env"]["git_commit"]
    base = "eager (decoders)" if mode == "vae" else "eager"
    if len(results) > 1 and base in results:
        key = {"e2e": "steady_fps", "dit": "dit_only_fps_equiv", "vae": "vae_only_fps_equiv"}[mode]
        out["ratios_vs_eager"] = {k: (r[key] / results[base][key]) if r[key] and results[base][key] else None
                                  for k, r in results.items()}
        out["ratios_metric"] = key
    out["projected"] = _projection(results, mode)
    _table(console, Table, out)
    if out_json is not None:
        write_json(out, out_json)
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
