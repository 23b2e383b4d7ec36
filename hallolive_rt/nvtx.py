"""Stage ranges and stage times for a stream, all through ``with stage("dit/step", block=i, step=k):``: each stage
is an NVTX range of the domain ``hallolive-rt`` (payload ``block * 1000 + step``), a torch-profiler range while
a torch profiler records, and a timed stage while a ``StageTimer`` is installed. ``RANGES`` is the tree of stage
names; with none of this on, ``stage()`` hands back one shared no-op, and ``suppressed()`` turns it all off."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from hallolive_rt.timing import elapsed_ms, mark

__all__ = ["DOMAIN", "RANGES", "StageRecord", "StageTimer", "describe", "encode_payload", "stage", "suppressed"]

DOMAIN = "hallolive-rt"

# The range tree in the order the streaming loop enters it: name -> (parent, payload fields). `text/encode`
# runs once per prompt, before `session` (the streaming loop, after build and capture); `dit/step` repeats
# per denoising step, `block` per block; the decoders start on a block right after its steps.
RANGES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "text/encode": (None, ()),
    "session": (None, ()),
    "block": ("session", ("block",)),
    "dit/step": ("block", ("block", "step")),
    "vae/video": ("block", ("block",)),
    "vae/audio": ("block", ("block",)),
    "dit/context": ("block", ("block",)),
    "io/write": ("block", ("block",)),
}
# Category ids 1..6 in this order (NVTX numbers them by first use), and an ARGB colour per family.
_COLORS = {"session": 0xFF7F7F7F, "text": 0xFF9467BD, "block": 0xFF1F77B4, "dit": 0xFF2CA02C,
           "vae": 0xFFFF7F0E, "io": 0xFFD62728}


def encode_payload(block: int, step: int | None = None) -> int:
    if step is not None and not 0 <= step < 1000:
        raise ValueError(f"step {step} does not fit the payload block * 1000 + step")
    return block * 1000 + (step or 0)


def _client():
    """(name, push, pop) of the NVTX client; push is None when no tool listens (then nothing is pushed)."""
    try:
        import nvtx
    except ImportError:
        nvtx = None
    if nvtx is not None:
        dom = nvtx.get_domain(DOMAIN)
        if dom is nvtx._lib.dummy_domain:
            return "nvtx", None, None
        cats = {fam: dom.get_category_id(fam) for fam in _COLORS}

        def push(name, fam, payload):
            dom.push_range(dom.get_event_attributes(name, _COLORS[fam], cats[fam], payload))
        return "nvtx", push, dom.pop_range
    if not hasattr(torch._C, "_nvtx"):
        return "none", None, None
    if not os.environ.get("NVTX_INJECTION64_PATH"):
        return "torch.cuda.nvtx", None, None
    return "torch.cuda.nvtx", lambda name, fam, payload: torch.cuda.nvtx.range_push(name), torch.cuda.nvtx.range_pop


_BACKEND, _push, _pop = _client()
_nvtx_on = _push is not None and os.environ.get("HALLOLIVE_NVTX", "1").strip().lower() not in ("0", "false", "off")
_timer: "StageTimer | None" = None
_suppressed = False
_torch_profiling = torch._C._autograd._profiler_enabled


def describe() -> dict:
    """Which NVTX client emits the ranges and whether they are on (for logs and bench JSON)."""
    return {"backend": _BACKEND, "domain": DOMAIN if _BACKEND == "nvtx" else None,
            "tool_attached": _push is not None, "enabled": _nvtx_on}


@contextmanager
def suppressed():
    """No ranges (NVTX, torch) and no timing inside: the warm-up runs before a profiled one."""
    global _suppressed
    prev, _suppressed = _suppressed, True
    try:
        yield
    finally:
        _suppressed = prev


_OFF = nullcontext()  # reusable: the one no-op every stage() returns while nothing listens


def stage(name: str, **payload: int | None):
    """Context manager for one stage of ``RANGES`` with its payload fields (``block=``, ``step=``; None counts
    as absent); a shared no-op when nothing listens."""
    if _suppressed or not (_nvtx_on or _timer is not None or _torch_profiling()):
        return _OFF
    if name not in RANGES:
        raise KeyError(f"stage {name!r} is not in hallolive_rt.nvtx.RANGES ({', '.join(RANGES)})")
    fields = RANGES[name][1]
    if {k for k, v in payload.items() if v is not None} != set(fields):
        raise ValueError(f"stage {name!r} takes {', '.join(fields) or 'no block/step'}; got {payload}")
    return _on(name, payload.get("block"), payload.get("step"))


@contextmanager
def _on(name, block, step):
    pushed = _nvtx_on
    if pushed:
        _push(name, name.split("/")[0], None if block is None else encode_payload(block, step))
    timer, rec = _timer, None
    if timer is not None and (t0 := timer._mark()) is not None:
        rec = [name, block, step, t0, None]
        timer._stages.append(rec)
    try:
        with torch.autograd.profiler.record_function(name) if _torch_profiling() else _OFF:
            yield
    finally:
        if rec is not None:
            rec[4] = timer._mark()
        if pushed:
            _pop()


@dataclass(frozen=True)
class StageRecord:
    name: str
    block: int | None
    step: int | None
    ms: float


class StageTimer:
    """Times each stage entered while installed (``with timer:``) with ``hallolive_rt.timing`` marks: CUDA
    events on the current stream when ``device`` is a GPU (one sync, in ``records()``), else perf_counter.
    A stage entered while a CUDA graph is being captured is not timed (its event would join the graph)."""

    def __init__(self, device: torch.device | str | None = None):
        self.cuda = torch.device(device or "cpu").type == "cuda" and torch.cuda.is_available()
        self._stages: list[list] = []  # [name, block, step, start mark, end mark] in order of entry
        self._prev: list[StageTimer | None] = []

    def _mark(self):
        return None if self.cuda and torch.cuda.is_current_stream_capturing() else mark(self.cuda)

    def __enter__(self) -> "StageTimer":
        global _timer
        self._prev.append(_timer)
        _timer = self
        return self

    def __exit__(self, *exc):
        global _timer
        _timer = self._prev.pop()

    def records(self) -> list[StageRecord]:
        """Every timed stage in order of entry (synchronizes the device once on GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        return [StageRecord(n, b, s, elapsed_ms(t0, t1)) for n, b, s, t0, t1 in self._stages if t1 is not None]
