"""GPU: build the full-size AOTInductor DiT block package(s), check them against eager, record the numbers.

    python bench/export_aoti_bench.py --preset hallolive-512x992 --variants 1 --out bench/results

For each requested DiT variant (stream order; --variants 1 = the first block's shapes) it records the
export + compile time, package size, load time, max/mean abs error of flow_v/flow_a and of the written
cache rows against eager (random weights, bf16, same inputs), and the median step latency of both, in
``<out>/export_aoti_<preset>_<gpu>.json``. Needs a CUDA GPU with memory for the bf16 DiT (~23 GB) plus
caches; the package build itself runs on the host compiler (minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hallolive_rt.export.aoti import export_aoti, load_aoti
from hallolive_rt.export.contracts import contracts_for
from hallolive_rt.export.dit import dit_export_mode
from hallolive_rt.export.submodels import build_submodel, wrapper_for
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime.metrics import env_info


def _err(a, b):
    d = (a.float() - b.float()).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "max_ref": b.float().abs().max().item()}


def _time(fn, n=5):
    """Raw seconds of n synchronized calls (the caller has warmed fn up)."""
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="hallolive-512x992")
    ap.add_argument("--variants", type=int, default=1)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/hallolive_aoti_bench")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    p = load_profile(a.preset)
    dev = "cuda"
    contract = contracts_for(p, torch.bfloat16)["dit"]
    t0 = time.perf_counter()
    dit = build_submodel("dit", p, None, 0, torch.bfloat16, dev)
    build_s = time.perf_counter() - t0
    rows = []
    for v in contract.variants[:a.variants]:
        with dit_export_mode(dit, float64_time=True):
            mod = wrapper_for("dit", dit, contract, v, functional=False)
            ins = v.sample_inputs(seed=1, device=dev)
            for i in range(4, 12):
                ins[i].normal_()
            t = time.perf_counter()
            path = export_aoti(mod, v, Path(a.work) / f"dit_{v.name}.pt2", device=dev, inputs=[x.clone() for x in ins])
            compile_s = time.perf_counter() - t
            t = time.perf_counter()
            runner = load_aoti(path, dev)
            load_s = time.perf_counter() - t
            ref_in, pkg_in = [x.clone() for x in ins], [x.clone() for x in ins]
            with torch.no_grad():
                ref = mod(*ref_in)
            got = runner(*pkg_in)
            errs = {"flow_v": _err(got[0], ref[0]), "flow_a": _err(got[1], ref[1])}
            for k, name in zip(range(4, 8), ("video_k", "video_v", "fusion_k", "fusion_v")):
                errs[name] = _err(pkg_in[k], ref_in[k])
            with torch.no_grad():
                eager_raw = _time(lambda: mod(*ref_in))
            pkg_raw = _time(lambda: runner(*pkg_in))
        rows.append({"variant": v.name, "static": v.static, "compile_s": compile_s, "load_s": load_s,
                     "package_bytes": path.stat().st_size, "errors": errs,
                     "eager_step_s": statistics.median(eager_raw), "aoti_step_s": statistics.median(pkg_raw),
                     "eager_step_raw_s": eager_raw, "aoti_step_raw_s": pkg_raw})
        print(json.dumps(rows[-1], indent=1))
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    res = {"command": " ".join(["python", *sys.argv]), "env": env_info([dev]),
           "preset": p.name, "profile_digest": p.digest(), "precision": "bf16", "weights": "random:0",
           "host": platform.node(),
           "dit_build_s": build_s, "variants": rows,
           "tolerance_note": "bf16: compare max_abs against max_ref; eager and package share inputs and weights"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"export_aoti_{p.name}_{gpu}.json"
    f.write_text(json.dumps(res, indent=1))
    print(f"wrote {f}")


if __name__ == "__main__":
    main()
