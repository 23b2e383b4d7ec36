"""The program a profiler attaches to in the GPU session's ncu entries: the bench's block loop
(``bench_main(mode="e2e")``, random weights, an encoded random prompt, no text encoder, no MP4) for a few
blocks, after ``--warmup-blocks`` blocks run with every stage range suppressed, so that the kernels an NVTX
filter selects are those of warm blocks. It writes a JSON with the stage ranges the profiled blocks
entered (name -> count, from ``hallolive_rt.nvtx.StageTimer``), the NVTX client in use and the bench's
block times, so a profile that caught no kernel can be told apart from a range that never ran.

    python bench/ncu_target.py --preset hallolive-512x992 --device cuda --blocks 2 --out target.json
"""

from __future__ import annotations

import os
import sys

for _mod in filter(None, os.environ.get("HALLOLIVE_SIMULATE_MISSING", "").split(",")):
    sys.modules[_mod.strip()] = None  # as bench/gpu_phase.py: the same imports missing in the profiled program

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402


def run(preset: str, device: str, backend: str, blocks: int, warmup_blocks: int, video_decoder: str) -> dict:
    from hallolive_rt import nvtx
    from hallolive_rt.options import from_flat
    from hallolive_rt.runtime.bench import bench_main
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.resolve import resolve_run

    model, dit, decoders = from_flat({"preset": preset, "device": device, "random_weights": True,
                                      "backend": backend, "video_decoder": video_decoder})
    r = resolve_run(model, dit, decoders, blocks=blocks, text=False)
    t = time.perf_counter()
    comps = load_components(r.profile, None, dit_device=r.dit_device, vae_device=r.vae_device, dtype=r.profile.dtype,
                            seed=model.seed, with_text=False, decoders=decoders)
    build_s = time.perf_counter() - t
    kw = {"backends": [backend], "mode": "e2e", "warmup_runs": 0, "components": comps}
    if warmup_blocks:
        with nvtx.suppressed():  # no range: the filter skips these kernels (first calls, autotuning)
            bench_main(model, dit, decoders, blocks=warmup_blocks, **kw)
    timer = nvtx.StageTimer(str(r.dit_device))
    with timer:
        out = bench_main(model, dit, decoders, blocks=blocks, **kw)
    ranges = Counter(rec.name for rec in timer.records())
    res = next(iter(out["results"].values()))
    return {"preset": out["preset"], "device": str(r.dit_device), "backend": backend, "video_decoder": video_decoder,
            "blocks": blocks, "warmup_blocks": warmup_blocks, "build_s": build_s, "ranges_entered": dict(ranges),
            "nvtx": nvtx.describe(), "stage_ms_median": res.get("stage_ms_median"),
            "block_time_s": (res.get("block_time_s") or {}).get("median"), "env": out["env"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--video-decoder", default="full")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--warmup-blocks", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    res = run(a.preset, a.device, a.backend, a.blocks, a.warmup_blocks, a.video_decoder)
    a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
