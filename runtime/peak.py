"""The measured dense-GEMM peak of a device, what ``bench``'s stage shares are set against beside the
assumed 790 TFLOP/s: ``measure_gemm_peak("cuda:0", torch.bfloat16)`` -> ``{"tflops", "n", ...}``, the best
of ``iters`` square ``n x n x n`` matmuls after a warm-up, timed with CUDA events (one synchronize at the
end): clocks and power limits included. On a CPU a small size, recorded all the same (one JSON schema).
"""

from __future__ import annotations

import time

import torch

__all__ = ["measure_gemm_peak"]


@torch.no_grad()
def measure_gemm_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                      iters: int = 20, warmup: int = 5) -> dict:
    """Best dense GEMM throughput of ``device`` in ``dtype`` (TFLOP/s) with how it was measured."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = n or (8192 if cuda else 512)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    times = []
    if cuda:
        with torch.cuda.device(dev):
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
            for start, end in ev:
                start.record()
                torch.mm(a, b, out=out)
                end.record()
            torch.cuda.synchronize(dev)
            times = [s.elapsed_time(e) / 1e3 for s, e in ev]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t)
    best = min(times)
    return {"tflops": 2 * n**3 / best / 1e12, "n": n, "dtype": str(dtype).removeprefix("torch."), "iters": iters,
            "best_s": best, "device": str(dev), "how": "best of square matmuls, " +
            ("CUDA events" if cuda else "perf_counter")}
