"""``hallolive-rt bench``: N blocks per backend in one process through the session's own block loop, a
table, and a JSON under bench/results/. Modes (each from a fixed random text context, never zeros): ``e2e``
the full session (DiT + decoders + D2H, overlapped as ``stream`` runs it); ``dit`` the same loop without
decoding (``StreamSession.run(decode=False)``); ``vae`` the decode pipeline alone on random latents. Every
mode reports the stage FPS-equivalents it measures and the two-device throughput min(DiT-only, VAE-only)
labelled ``projected``; per-stage TFLOP/s use the FLOP counts committed in runtime/flops.py. One warm-up
stream per run precedes the timed one; weights are built on the device; the JSON is rewritten after every
timed block (a run killed part-way keeps what finished). The DiT options and the decoder variants are
recorded at the top of the JSON and in each result's ``session``: compare runs that differ only in one."""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from hallolive_rt.errors import InputError
from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource, VideoDecodeOptions
from hallolive_rt.profile import Profile

from .flops import FlopCounts, count_flops
from .metrics import achieved_tflops, emitter, env_info, percentile, stream_metrics
from .backends import BACKENDS
from .resolve import ResolvedRun, resolve_run
from .vae_runner import check_vae_options

__all__ = ["bench_main", "FlopCounts", "count_flops", "combine_projection", "MODES"]

MODES = ("e2e", "dit", "vae")
BF16_PEAK_TFLOPS = 790.0  # dense bf16 peak assumed for H100/H200 (docs/MEASURE.md, stage_tflops)


# ---- the runs: generators of DecodedBlocks, one per block as it finishes --------------------------------

def _random_ctx(profile: Profile, device, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed + 99)
    return (0.5 * torch.randn(1, profile.text.text_len, profile.text.text_dim, generator=g, device=device)).to(dtype)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _vae_blocks(pipe, profile: Profile, blocks: int, seed: int) -> Iterator:
    """Decode random latents block by block through ``pipe`` (a sequential DecodePipeline), one block each."""
    from hallolive_rt.cache_policy import choose_policy
    from hallolive_rt.stream import BlockOutput

    from .block_marks import BlockMarks

    s, v, a = profile.stream, profile.video, profile.audio
    dev, dt = pipe.vae_dev, pipe.st_video.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    pipe.start()
    for plan, _ in zip(choose_policy(profile, blocks).plans(), range(blocks)):
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            r = lambda *sh: torch.randn(sh, generator=g, device=dev).to(dt)  # noqa: E731
            out = BlockOutput(plan.index, r(1, s.latent_frames_per_block, v.latent_channels, v.latent_height,
                                            v.latent_width), r(1, s.audio_tokens_per_block, a.latent_channels),
                              r(1, s.future_audio_tokens, a.latent_channels), plan)
            m = pipe.clock.mark()
            pipe.submit(out, BlockMarks(dit_start=m, context=(m, m), dit_end=m))  # decodes inline
        for b in pipe.ready() + (pipe.finish() if plan.index + 1 == blocks else []):
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


def _command(model: ModelSource, dit: DiTOptions, decoders: DecoderOptions, backends, n, mode, variants,
             compare_overlap) -> str:
    if "bench" in " ".join(sys.argv[:2]):
        return "hallolive-rt bench " + " ".join(sys.argv[2:])
    return (f"bench_main({model!r}, {dit!r}, {decoders!r}, backends={backends}, blocks={n}, mode={mode!r}, "
            f"vae_variants={[v.label for v in variants]}, compare_overlap={compare_overlap})")


def bench_main(model: ModelSource | None = None, dit: DiTOptions | None = None, decoders: DecoderOptions | None = None,
               *, backends: list[str] | None = None, vae_variants: list[VideoDecodeOptions] | None = None,
               blocks: int | None = None, mode: str = "e2e", out_json: str | Path | None = None,
               warmup_runs: int = 1, compare_overlap: bool = False, console=None, components=None,
               on_update: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; print a table; write ``out_json`` (if given, after every block); return the JSON.
    ``backends`` None: eager and what ``dit.backend`` resolves to; ``components``: models already built for
    this preset and dtype; ``on_update``: called with the JSON so far after every timed block and at the end."""
    from rich.console import Console
    from rich.table import Table

    from hallolive_rt import nvtx
    from hallolive_rt.cache_policy import choose_policy

    from .components import load_components, weights_nbytes
    from .decode_pipeline import DecodePipeline
    from .peak import measure_gemm_peak
    from .session import StreamSession

    console = console or Console(stderr=True, width=200)
    model = model or ModelSource(preset="hallolive-512x992", random_weights=True, device="cuda")
    dit, decoders = dit or DiTOptions(), decoders or DecoderOptions()
    if mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not model.random_weights and model.model_dir is None and components is None:
        raise InputError("bench needs --random-weights or --model-dir")
    if components is not None:
        model = replace(model, device=str(components.dit_device), vae_device=str(components.vae_device))
    variants = vae_variants or [decoders.runner]
    # every backend of the run checked before anything is built: a choice that cannot run fails now
    first = resolve_run(model, dit, decoders, blocks=blocks, text=False, flag="--backends")
    prof, dit_dev, vae_dev = first.profile, first.dit_device, first.vae_device
    if components is not None and (components.profile.name, components.dtype) != (prof.name, prof.dtype):
        raise InputError(f"components were built for {components.profile.name} {components.dtype}, "
                         f"not {prof.name} {prof.dtype}")
    n = first.nblocks
    if n is None:
        raise InputError("bench runs a finite number of blocks: pass --blocks N")
    names = list(dict.fromkeys(backends or default_backends(first, console)))
    resolved = {name: _resolve_backend(model, dit, decoders, name, n) for name in names if mode != "vae"}
    for vo in variants:
        check_vae_options(vo, vae_dev)
    runs = _run_variants(mode, names, variants, [True, False] if compare_overlap else [decoders.overlap])
    t = time.perf_counter()
    comps = components or load_components(prof, None if model.random_weights else model.model_dir,
                                           dit_device=dit_dev, vae_device=vae_dev, dtype=prof.dtype,
                                           seed=model.seed, with_text=False, ema=model.ema, decoders=decoders)
    _sync(dit_dev)
    build_s = time.perf_counter() - t
    peak = measure_gemm_peak(dit_dev, prof.dtype)  # the card at hand, in this process (~0.1 s)
    ctx = _random_ctx(prof, dit_dev, prof.dtype, model.seed)
    counts = FlopCounts(prof, lean_context=dit.lean_context)
    flops = count_flops(prof, list(choose_policy(prof, n).plans()), len(prof.stream.denoising_steps), counts)
    results: dict[str, dict] = {}
    out = {
        "command": _command(model, dit, decoders, names, n, mode, variants, compare_overlap),
        "complete": False, "mode": mode, "preset": prof.name, "blocks": n, "dtype": prof.dtype_name,
        "dit_options": first.dit.to_dict(), "kv_ext": first.kv_ext, "video_decoder": decoders.video_decoder,
        "vae_variants": [vo.label for vo in variants], "overlap": "both" if compare_overlap else decoders.overlap,
        "weights": comps.source, "weights_bytes": weights_nbytes(comps),
        "build_s": build_s if components is None else None, "dit_device": str(dit_dev), "vae_device": str(vae_dev),
        "shapes": prof.to_dict(), "flops_per_block": flops, "flops": counts.describe(),
        "bf16_peak_tflops_assumed": BF16_PEAK_TFLOPS, "gemm_peak_measured": peak, "nvtx": nvtx.describe(),
        "env": env_info([dit_dev, vae_dev]), "results": results, "projected": None,
    }
    if first.backend_choice is not None:
        out["backend_choice"] = first.backend_choice.describe()
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
                list(_vae_blocks(pipe, prof, min(n, 2), model.seed))
            timed = _vae_blocks(pipe, prof, n, model.seed)
        else:
            r = resolved.pop(name, None) or _resolve_backend(model, dit, decoders, name, n)  # prepared once
            sess = StreamSession(comps, prof, dit=r.dit, decoders=replace(decoders, runner=vae_opts, overlap=ov),
                                 backend=r.backend, backend_choice=r.backend_choice, blocks=n)
            sess_info = sess.describe()
            for _ in range(warmup_runs):
                list(sess.run(ctx, model.seed, decode=mode == "e2e"))
            timed = sess.run(ctx, model.seed, decode=mode == "e2e")
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


def _resolve_backend(model, dit, decoders, name: str, blocks: int) -> ResolvedRun:
    if name not in BACKENDS:
        raise InputError(f"--backends {name}: unknown; choose from {', '.join(BACKENDS)}")
    try:
        artifacts = dit.artifacts if name in ("aoti", "tensorrt") else None  # the others run the PyTorch DiT
        return resolve_run(model, replace(dit, backend=name, artifacts=artifacts), decoders, blocks=blocks, text=False,
                           flag="--backends")
    except InputError as e:
        raise InputError(f"--backends {name} cannot run here: {e}") from e.__cause__


def _run_variants(mode: str, backends: list[str], vae_variants: list, overlaps: list[bool]) -> list[tuple]:
    """(result key, DiT backend, video runner options, overlap) per run, baselines first: vae, the eager
    decoder then each variant; dit, one run per backend; e2e, every backend x video variant x overlap."""
    if mode == "vae":
        vs = list(dict.fromkeys([VideoDecodeOptions(), *vae_variants]))
        return [(f"{vo.label} (decoders)", "eager", vo, False) for vo in vs]
    if mode == "dit":
        return [(b, b, VideoDecodeOptions(), overlaps[0]) for b in backends]
    return [(b + ("" if vo.label == "eager" else f" vae={vo.label}") + ("" if ov or len(overlaps) == 1 else
             " no-overlap"), b, vo, ov) for b in backends for vo in vae_variants for ov in overlaps]


def default_backends(run: ResolvedRun, console=None) -> list[str]:
    """What ``--backends`` means when not given: eager (the baseline) and the backend the run's
    ``--backend`` resolved to (``auto``: its pick here; with ``--artifacts``: the format it holds)."""
    names = list(dict.fromkeys(["eager", run.dit.backend]))
    if console is not None and run.backend_choice is not None:
        console.print(f"backends: {', '.join(names)} (auto: {run.backend_choice.reason})", highlight=False)
    return names


def _projection(results: dict, mode: str) -> dict:
    """Two-device throughput from the stages measured: min(DiT-only, VAE-only) FPS-equivalents."""
    return _two_device(results if mode != "vae" else None, results if mode != "dit" else None,
                       "projected (not measured): DiT on one device, decoders on another; min of the two stages' "
                       "FPS-equivalents (best backend); combine a dit-mode and a vae-mode JSON when each was run alone")


def _two_device(dit_results: dict | None, vae_results: dict | None, label: str) -> dict:
    def best(results, key):
        return None if results is None else max((r[key] or 0 for r in results.values()), default=0)

    dit, vae = best(dit_results, "dit_only_fps_equiv"), best(vae_results, "vae_only_fps_equiv")
    return {"label": label, "dit_only_fps_equiv": dit, "vae_only_fps_equiv": vae,
            "two_device_fps": min(dit, vae) if dit and vae else None}


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _table(console, Table, out: dict) -> None:
    t = Table(title=f"hallolive-rt bench: {out['preset']} {out['mode']} x{out['blocks']} blocks "
                    f"({out['dtype']}, {out['dit_device']}/{out['vae_device']}, fused projections "
                    f"{'on' if out['dit_options']['fuse_projections'] else 'off'}, attention kernel "
                    f"{out['dit_options']['attn_kernel']}, video decoder {out['video_decoder']})")
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
    return _two_device(d["results"], v["results"], "projected (not measured): min(DiT-only, VAE-only FPS-equivalent)")
