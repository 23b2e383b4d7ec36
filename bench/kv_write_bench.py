"""Microbenchmark: hallolive_kv ops against the plain-torch write (index_copy + separate RoPE).

    python bench/kv_write_bench.py                      # CUDA, full-size video block, bf16
    python bench/kv_write_bench.py --device cpu --tiny  # smoke run of the script itself

Default shapes are one video self-attention block of the released model (docs/FACTS.md sections 2 and 4):
cache [1, 14880, 24, 128] bf16, a block of N = 2976 tokens (6 latent frames x 496), written with a sink of
one block and a ring over the rest so the write wraps. Each variant is warmed up, then timed with CUDA
events around --repeat back-to-back calls per sample; the JSON keeps the raw times, the median and
the effective bandwidth (bytes the op must move / median time). Written to bench/results/kv_write_bench_<device>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hallolive_rt.kvcache import get_kv_ops  # noqa: E402
from hallolive_rt.kvcache.ops import has_cuda_kernels  # noqa: E402  (builds the extension on first use)
from hallolive_rt.runtime.metrics import env_info  # noqa: E402


# ext vs torch, relative to the largest cached value: fp32 differs at most by contraction order, bf16 / fp16
# by one rounding step of the stored result (the tests' tolerances, tests/test_kv_ext.py).
AGREE_REL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _timer(device: torch.device, repeat: int):
    """Seconds per call, one sample per `repeat` back-to-back calls (launch cost included, as in a loop)."""
    if device.type == "cuda":
        def run(fn, iters):
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeat):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3 / repeat)
            return times
    else:
        def run(fn, iters):
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                for _ in range(repeat):
                    fn()
                times.append((time.perf_counter() - t0) / repeat)
            return times
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="small shapes (script smoke test)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10, help="calls per timed sample")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    b, h, d = 1, 24, 128
    s, n = (14880, 2976) if not args.tiny else (120, 24)
    if args.tiny:
        h, d = 4, 32
    sink, ring = n, s - n
    offset = torch.tensor([sink + ring - n // 2], device=device)  # the block straddles the ring's end

    gen = torch.Generator(device="cpu").manual_seed(0)
    cache = torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype)
    src = torch.randn(b, n, h, d, generator=gen).to(device=device, dtype=dtype)
    ang = torch.rand(n, d // 2, generator=gen).to(device) * 100
    cos, sin = ang.cos(), ang.sin()

    ext, ref = get_kv_ops("ext"), get_kv_ops("torch")
    elem = cache.element_size()
    block_bytes = b * n * h * d * elem
    table_bytes = 2 * n * (d // 2) * 4
    # op: (call on an implementation and a cache, bytes the op must move at least: read src (+ tables),
    # write the block; rerotate reads and writes the rows in place)
    ops = {
        "rope_write_block": (lambda impl, c: impl.rope_write_block(c, src, cos, sin, offset, sink, ring),
                             2 * block_bytes + table_bytes),
        "write_block": (lambda impl, c: impl.write_block(c, src, offset, sink, ring), 2 * block_bytes),
        "rerotate": (lambda impl, c: impl.rerotate(c, cos, sin, sink, n), 2 * block_bytes + table_bytes),
    }
    # A speed-up only counts if both sides compute the same thing: one call each on copies of the cache.
    agreement = {}
    for op, (call, _) in ops.items():
        got, want = cache.clone(), cache.clone()
        call(ext, got)
        call(ref, want)
        agreement[op] = {"max_abs_diff": (got.float() - want.float()).abs().max().item(),
                         "max_abs_ref": want.float().abs().max().item()}
        print(f"{op:26s} ext vs torch max abs diff {agreement[op]['max_abs_diff']:.3g}", file=sys.stderr)
        if agreement[op]["max_abs_diff"] > AGREE_REL[dtype] * agreement[op]["max_abs_ref"]:
            raise SystemExit(f"{op}: the extension and the torch reference disagree ({agreement[op]}, allowed "
                             f"{AGREE_REL[dtype]} x max_abs_ref for {args.dtype}); nothing timed, nothing written")
    del got, want
    variants = {f"{op}/{impl.name}": ((lambda call=call, impl=impl: call(impl, cache)), nbytes)
                for op, (call, nbytes) in ops.items() for impl in (ext, ref)}
    timer = _timer(device, args.repeat)
    results = {}
    for name, (fn, nbytes) in variants.items():
        timer(fn, args.warmup)
        raw = timer(fn, args.iters)
        med = statistics.median(raw)
        results[name] = {"median_s": med, "p90_s": sorted(raw)[int(0.9 * (len(raw) - 1))],
                         "effective_GBps": nbytes / med / 1e9, "bytes": nbytes, "raw_s": raw}
        print(f"{name:26s} median {med * 1e6:9.1f} us  {nbytes / med / 1e9:8.1f} GB/s", file=sys.stderr)
    for op in ops:
        results[f"{op}/speedup"] = results[f"{op}/torch"]["median_s"] / results[f"{op}/ext"]["median_s"]

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": env_info([device]),  # devices, driver, torch / CUDA versions, git commit and dirty flag
        "kv_ext_cuda_kernels": has_cuda_kernels(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "shapes": {"cache": [b, s, h, d], "block": [b, n, h, d], "tables": [n, d // 2],
                   "ring_start": sink, "ring_size": ring, "offset": int(offset.cpu()[0])},
        "warmup": args.warmup,
        "iters": args.iters,
        "repeat": args.repeat,
        "agreement": agreement,
        "results": results,
    }
    out = args.out or REPO / "bench" / "results" / f"kv_write_bench_{device.type}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
