"""Backends against the reference on the same seed: ``check_backends(model, backends=[...], blocks=3)``
runs the first backend twice (the noise floor) and each other once, and reports per block the relative
error of the committed video [B, Fb, C, h, w] and audio [B, 30, Ca] latents against the reference
(``max_rel``, ``mean_rel``) and whether it is within the bf16 bound. Only the DiT runs. Definitions:
``docs/ARCHITECTURE.md``, "Checking a backend".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource

from .bench import _random_ctx, _sync
from .metrics import emitter, env_info
from .resolve import resolve_run

__all__ = ["check_backends", "relative_error", "BOUND"]

BOUND = {"max_rel": 5e-2, "mean_rel": 1e-2,
         "source": "bf16 bound of tests/test_stream_reference.py (and tests/test_backends.py for cudagraph)"}


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """max_rel, mean_rel, max_abs of ``x`` against ``ref`` (float64 math), bit equality, finiteness."""
    a, b = x.double(), ref.double()
    d = (a - b).abs()
    return {"max_rel": (d.max() / b.abs().max()).item(), "mean_rel": (d.mean() / b.abs().mean()).item(),
            "max_abs": d.max().item(), "bitwise_equal": bool(torch.equal(x, ref)),
            "finite": bool(torch.isfinite(a).all())}


def _summary(per_block: list[dict], key: str) -> dict:
    rows = [b[key] for b in per_block if key in b]
    if not rows:
        return {}
    out = {"blocks": len(rows)}
    for stream in ("video", "audio"):
        out[f"{stream}_max_rel"] = max(r[stream]["max_rel"] for r in rows)
        out[f"{stream}_mean_rel"] = max(r[stream]["mean_rel"] for r in rows)
    out["bitwise_equal"] = all(r[s]["bitwise_equal"] for r in rows for s in ("video", "audio"))
    finite = all(r[s]["finite"] for r in rows for s in ("video", "audio"))
    out["within_bound"] = finite and all(out[f"{s}_max_rel"] < BOUND["max_rel"] and
                                         out[f"{s}_mean_rel"] < BOUND["mean_rel"] for s in ("video", "audio"))
    return out


def check_backends(model: ModelSource | None = None, dit: DiTOptions | None = None, *,
                   backends: list[str] | None = None, blocks: int = 3, out_json: str | Path | None = None,
                   components=None, on_update: Callable[[dict], None] | None = None, console=None) -> dict:
    """Run the comparison (see the module docstring); print a table; return (and write) the JSON. ``model``
    default: the full-size preset with random weights on CUDA."""
    from rich.console import Console

    from .components import load_components
    from .session import StreamSession

    console = console or Console(stderr=True, width=200)
    model = model or ModelSource(preset="hallolive-512x992", random_weights=True, device="cuda")
    if components is not None:
        model = replace(model, device=str(components.dit_device))
    dit = dit or DiTOptions()
    backends = list(backends or ["eager", "cudagraph"])
    runs_of = {b: resolve_run(model, replace(dit, backend=b), DecoderOptions(), blocks=blocks, text=False)
               for b in backends}  # every backend checked before anything is built
    first = runs_of[backends[0]]
    prof, dit_dev, seed = first.profile, first.dit_device, model.seed
    comps = components or load_components(prof, None, dit_device=dit_dev, dtype=prof.dtype, seed=seed,
                                           with_text=False)
    ctx = _random_ctx(prof, dit_dev, prof.dtype, seed)
    ref = backends[0]
    runs: dict[str, dict] = {}
    per_block: list[dict] = [{"index": i} for i in range(blocks)]
    out = {"command": f"check_backends({model!r}, {dit!r}, backends={backends}, blocks={blocks})",
           "complete": False, "preset": prof.name, "blocks": blocks, "dtype": prof.dtype_name,
           "seed": seed, "dit_options": first.dit.to_dict(), "kv_ext": first.kv_ext, "reference": ref, "weights": comps.source, "device": str(dit_dev),
           "definitions": "max_rel = max|x-ref|/max|ref|, mean_rel = mean|x-ref|/mean|ref| of committed latents",
           "bound": BOUND, "runs": runs, "per_block": per_block, "summary": {},
           "env": env_info([dit_dev])}
    out["git_commit"] = out["env"]["git_commit"]

    emit = emitter(out, on_update, out_json)

    ref_latents: list = []
    plan = [(ref, ref, ref_latents)] + [(f"{ref} (repeat)", ref, None)] + [(b, b, None) for b in backends[1:]]
    sess, sess_backend = None, None
    for run_name, backend, keep in plan:
        if sess_backend != backend:
            del sess
            _sync(dit_dev)
            r = runs_of.pop(backend, None) or resolve_run(model, replace(dit, backend=backend), DecoderOptions(),
                                                          blocks=blocks, text=False)  # a backend is prepared once
            sess = StreamSession(comps, prof, dit=r.dit, backend=r.backend, blocks=blocks)
            sess_backend = backend
        latents = keep if keep is not None else []
        info = runs[run_name] = {"session": sess.describe(), "dit_ms": []}
        key = None if keep is not None else f"{run_name}_vs_{ref}"
        def keep_latents(i, block_out, latents=latents):
            latents.append((block_out.video.float().cpu(), block_out.audio.float().cpu()))

        for blk in sess.run(ctx, seed, decode=False, on_latents=keep_latents):
            info["dit_ms"].append(blk.times["dit"])
            if key is not None:
                (v, a), (rv, ra) = latents[blk.index], ref_latents[blk.index]
                per_block[blk.index][key] = {"video": relative_error(v, rv), "audio": relative_error(a, ra)}
                out["summary"][key] = _summary(per_block, key)
            emit()
    out["complete"] = True
    emit()
    for key, s in out["summary"].items():
        console.print(f"{key}: video max_rel {s['video_max_rel']:.3e} mean_rel {s['video_mean_rel']:.3e}, audio "
                      f"max_rel {s['audio_max_rel']:.3e} mean_rel {s['audio_mean_rel']:.3e}, bitwise equal "
                      f"{s['bitwise_equal']}, within bound {s['within_bound']}", highlight=False)
    return out
