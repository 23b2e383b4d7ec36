"""The viewer's verdict on an end-to-end bench result: per run, TTFF, steady FPS, the inter-block gaps
(the time between consecutive blocks' first frames arriving on the host) at p50 / p99 against the playback
time of one block, the ``real_time`` verdict by the rule ``REAL_TIME_RULE`` states, and peak GPU memory;
and ``MemoryCap``, which caps this process's CUDA allocator with ``torch.cuda.set_per_process_memory_fraction``
before anything is allocated, watches the peaks while the run goes, and says whether it fit."""

from __future__ import annotations

import resource
import sys

__all__ = ["REAL_TIME_RULE", "MemoryCap", "verdict", "viewer_summary", "is_out_of_memory"]

REAL_TIME_RULE = ("real_time = (gap_s.p99 <= block_playback_s) and (steady_fps >= target_fps), where gap_s are the "
                  "N-1 times between consecutive blocks' first frames on the host (block i vs block i-1, "
                  "i = 1..N-1), p50 / p99 by linear interpolation, block_playback_s = frames of a steady block / "
                  "the stream's fps (24 / 25 = 0.96 s at full size), steady_fps = frames of blocks 2..N / their "
                  "delivery time, target_fps = the stream's fps (25); None when a figure is missing (one block)")


def _percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def verdict(result: dict) -> dict:
    """The viewer's figures of one run of ``bench_main``'s ``results`` (a ``stream_metrics`` dict)."""
    gap = result.get("inter_block_gap_s") or {}
    gaps = list(gap.get("values") or [])
    playback, fps = gap.get("block_playback_s"), result.get("fps_written")
    p99, steady = _percentile(gaps, 99), result.get("steady_fps")
    checks = {"gap_p99_within_playback": None if p99 is None or playback is None else p99 <= playback,
              "steady_fps_at_least_target": None if steady is None or fps is None else steady >= fps}
    real = None if None in checks.values() else all(checks.values())
    session = result.get("session") or {}
    peak = result.get("peak_memory_gib") or {}
    return {"blocks": result.get("blocks"), "policy": session.get("policy"),
            "video_decoder": session.get("video_decoder"), "vae": (session.get("vae") or {}).get("label"),
            "dit_backend": session.get("backend"), "ttff_s": result.get("ttff_s"), "steady_fps": steady,
            "target_fps": fps,
            "gap_s": {"p50": _percentile(gaps, 50), "p99": p99, "max": max(gaps) if gaps else None,
                      "count": len(gaps)},
            "block_playback_s": playback, "real_time": real, "checks": checks,
            "peak_gpu_allocated_gib": max(peak.values()) if peak else None}


def viewer_summary(out: dict, cap: MemoryCap) -> dict:
    """What the viewer entry adds to the bench JSON: the rule, the verdict per run, the memory cap record."""
    return {"rule": REAL_TIME_RULE, "runs": {k: verdict(r) for k, r in (out.get("results") or {}).items()},
            "memory_cap": cap.record()}


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class MemoryCap:
    """Caps the CUDA caching allocator of this process at ``cap_gib`` on ``device`` (a fraction of the
    card's total memory), before the first allocation; ``watch()`` after every block keeps the peaks of
    allocated and reserved memory seen since (``bench_main`` resets the allocator's own peaks before each
    run, so they are read as the run goes); ``fits`` is set at the end: True when build, warm-up and the
    timed stream all ran under the cap, False on an out-of-memory error; ``lift`` removes the cap for a
    second run, whose peaks go to ``rerun``. On a CPU nothing is capped."""

    def __init__(self, cap_gib: float | None, device: str):
        import torch

        self.cap_gib, self.device = cap_gib, device
        self.fraction = self.total_gib = None
        self.applied, self.fits, self.error = False, None, None
        self.peak_allocated_gib = self.peak_reserved_gib = None
        self.rerun: dict | None = None  # the peaks of the run again without the cap, after an out-of-memory error
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.index = None
        if self.cuda:  # the fraction call needs an index: "cuda" alone means the current device
            dev = torch.device(device)
            self.index = dev.index if dev.index is not None else torch.cuda.current_device()
        if cap_gib is None:
            self.reason = "no cap asked for"
        elif not self.cuda:
            self.reason = f"{device}: no CUDA memory to cap"
        else:
            total = torch.cuda.get_device_properties(self.index).total_memory
            self.total_gib = total / 2**30
            self.fraction = float(min(1.0, cap_gib * 2**30 / total))
            torch.cuda.set_per_process_memory_fraction(self.fraction, self.index)
            self.applied, self.reason = True, None

    def watch(self) -> None:
        if not self.cuda:
            return
        import torch

        alloc = torch.cuda.max_memory_allocated(self.index) / 2**30
        res = torch.cuda.max_memory_reserved(self.index) / 2**30
        if self.rerun is not None:
            self.rerun["peak_allocated_gib"] = max(alloc, self.rerun["peak_allocated_gib"] or 0.0)
            self.rerun["peak_reserved_gib"] = max(res, self.rerun["peak_reserved_gib"] or 0.0)
            return
        self.peak_allocated_gib = max(alloc, self.peak_allocated_gib or 0.0)
        self.peak_reserved_gib = max(res, self.peak_reserved_gib or 0.0)

    def lift(self) -> None:
        """Remove the cap (after ``done`` recorded that the run did not fit) for a second, uncapped run."""
        import torch

        torch.cuda.set_per_process_memory_fraction(1.0, self.index)
        torch.cuda.reset_peak_memory_stats(self.index)
        self.rerun = {"peak_allocated_gib": None, "peak_reserved_gib": None,
                      "what": "the same run without the cap, after the capped one ran out of memory: the memory "
                              "the run needs"}

    def done(self, error: BaseException | None = None) -> None:
        if self.rerun is not None:
            return  # the verdict is the capped run's
        self.watch()
        if error is not None and is_out_of_memory(error):
            self.fits, self.error = False, f"{type(error).__name__}: {error}"[:2000]
        elif error is None and self.applied:
            self.fits = True

    def record(self) -> dict:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"cap_gib": self.cap_gib, "applied": self.applied, "fraction": self.fraction,
                "device_total_gib": self.total_gib, "fits": self.fits, "error": self.error, "reason": self.reason,
                "peak_allocated_gib": self.peak_allocated_gib, "peak_reserved_gib": self.peak_reserved_gib,
                "host_peak_rss_gib": rss / 2**30, "uncapped_rerun": self.rerun,
                "how": "torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total_memory) before the "
                       "weights are built; fits = build, warm-up and timed stream ran without an out-of-memory "
                       "error; peaks = torch.cuda.max_memory_allocated / max_memory_reserved read after every "
                       "block (the warm-up and the timed stream; the build ran under the cap as well)"}
