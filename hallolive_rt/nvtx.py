"""NVTX ranges, torch-profiler ranges and stage timing for every stage of the stream: one helper.

    from hallolive_rt.nvtx import stage
    with stage("dit/step", block=i, step=k):
        ...

Range tree
----------
All ranges live in the NVTX domain ``hallolive-rt``; each carries the category of its stage family
(the name's first path component; named in the domain with fixed ids session=1 text=2 block=3
dit=4 vae=5 io=6) and, where listed, an int64 payload. This table is the single
source: ``documented_tree()`` parses it, ``stage()`` takes categories and payload rules from it, and
tests/test_nvtx.py compares what a real NVTX tool records against it.

    range             category  payload      repeat
    text/encode       text      -            once
    session           session   -            once
      block           block     block        per-block
        dit/step      dit       block,step   per-step
        vae/video     vae       block        once
        vae/audio     vae       block        once
        dit/context   dit       block        once
        io/write      io        block        once

``text/encode`` runs once per prompt, before any warm-up stream, so it sits beside ``session``, not in
it. ``session`` wraps the streaming loop of one stream (after model build, compilation and graph capture,
so set-up never lands inside it); ``block`` is one streaming block: ``per-step`` denoising steps
(4 in both presets), the two decoders (handed the block's latents right after its steps, so they
run before or beside the next range), the context pass that writes the KV caches, and the hand-off
of decoded media to the writer (after the context pass: the block's DiT times are final then). NVTX
push/pop ranges nest per thread: the tree is that of the thread running the loop; a stage entered on
another thread (a writer or decode thread) starts its own root there, which Nsight shows on that
thread's row.

Payload
-------
``payload = block * 1000 + step`` as an NVTX int64 payload (``step`` is 0 for ranges without a
step): Nsight Systems shows it in the range's tooltip and in ``NVTX_EVENTS.int64Value`` of its SQLite
export, where block 3 step 2 reads ``3002``. The message stays the bare stage name, so Nsight's NVTX
filters (``--nvtx-capture session@hallolive-rt``, ncu ``--nvtx-include``) match one fixed string
and the number of registered strings does not grow with the stream. ``decode_payload`` inverts it.

When is it on
-------------
* NVTX: when an NVTX tool is attached to the process (nsys, ncu, or any library named by
  ``NVTX_INJECTION64_PATH``), NVTX's own injection mechanism. ``HALLOLIVE_NVTX=0`` in the environment
  or ``enable_nvtx(False)`` silences our ranges even under a tool.

Which NVTX client emits them (``describe()`` says; ``HALLOLIVE_NVTX_BACKEND=nvtx|torch|none`` forces one):
  ``nvtx``             the ``nvtx`` package: the ``hallolive-rt`` domain, categories and payloads as above;
                       with no tool it hands back a dummy domain and we never call it.
  ``torch.cuda.nvtx``  when the package is missing (the GPU image lacks it) and torch is a CUDA build:
                       push/pop of the bare stage names in NVTX's default domain, no category, no payload
                       (so ``session@hallolive-rt`` filters do not match: filter on ``session``); on only
                       when ``NVTX_INJECTION64_PATH`` names a tool, as nsys and ncu set it.
  ``none``             neither: ranges are no-ops; torch-profiler ranges and timing still work.
* torch: ``torch.profiler.record_function`` ranges with the same names whenever a torch profiler is
  recording (``hallolive-rt profile --session torch`` or one of your own).
* timing: while a ``StageTimer`` is installed (``with timer:``), each stage is timed with CUDA events
  (GPU) or ``perf_counter`` (CPU); read ``timer.summary()`` after the run (one sync, at the end).
When none of these holds, ``stage()`` returns one shared no-op context manager: the cost is a
function call, a flag check and torch's profiler-enabled query (tested: well under 2 us per enter/exit).
``suppressed()`` turns all three off for a region (warm-up runs before a profiled run).
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "DOMAIN", "PAYLOAD_STRIDE", "RangeSpec", "StageRecord", "StageStat", "StageTimer",
    "decode_payload", "describe", "documented_tree", "enable_nvtx", "encode_payload", "expected_tree",
    "nvtx_enabled", "range_names", "stage", "suppressed",
]

DOMAIN = "hallolive-rt"
PAYLOAD_STRIDE = 1000

# ARGB per family so the Nsight timeline reads at a glance.
_COLORS = {"session": 0xFF7F7F7F, "text": 0xFF9467BD, "block": 0xFF1F77B4, "dit": 0xFF2CA02C,
           "vae": 0xFFFF7F0E, "io": 0xFFD62728}


# ---- the documented tree (parsed from this module's docstring) ----------------------------------

@dataclass(frozen=True)
class RangeSpec:
    name: str
    category: str
    payload: tuple[str, ...]       # () or ("block",) or ("block", "step")
    repeat: str                    # "once" | "per-block" | "per-step"
    children: tuple["RangeSpec", ...]


def _parse_tree(doc: str) -> tuple[RangeSpec, ...]:
    lines = doc.split("Range tree", 1)[1].splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["range"])
    rows: list[tuple[int, list[str]]] = []
    for ln in lines[head + 1:]:
        if not ln.strip():
            break
        rows.append((len(ln) - len(ln.lstrip()), ln.split()))
    base = rows[0][0]

    def build(i: int, depth: int) -> tuple[list[RangeSpec], int]:
        out: list[RangeSpec] = []
        while i < len(rows) and (rows[i][0] - base) // 2 == depth:
            name, cat, pay, rep = rows[i][1]
            kids, i = build(i + 1, depth + 1)
            payload = () if pay == "-" else tuple(pay.split(","))
            out.append(RangeSpec(name, cat, payload, rep, tuple(kids)))
        return out, i

    tree, _ = build(0, 0)
    return tuple(tree)


_TREE = _parse_tree(__doc__)


def documented_tree() -> tuple[RangeSpec, ...]:
    """The documented range tree (roots), as parsed from the module docstring."""
    return _TREE


def _flatten(specs) -> dict[str, RangeSpec]:
    out: dict[str, RangeSpec] = {}
    for s in specs:
        out[s.name] = s
        out.update(_flatten(s.children))
    return out


_SPECS = _flatten(_TREE)
for _s in _SPECS.values():
    # Names double as Nsight filter strings: keep them to lower-case words joined by '/', and the
    # category equal to the family (first word), which also picks the colour.
    if not re.fullmatch(r"[a-z]+(/[a-z]+)*", _s.name) or _s.category != _s.name.split("/")[0]:
        raise ImportError(f"hallolive_rt.nvtx: malformed range tree entry {_s}")


def range_names() -> list[str]:
    """Every documented range name, in tree order."""
    return list(_SPECS)


def encode_payload(block: int, step: int | None = None) -> int:
    if step is not None and not 0 <= step < PAYLOAD_STRIDE:
        raise ValueError(f"step {step} does not fit the payload encoding (0 <= step < {PAYLOAD_STRIDE})")
    return block * PAYLOAD_STRIDE + (step or 0)


def decode_payload(payload: int) -> tuple[int, int]:
    """(block, step) from an NVTX payload written by ``stage``."""
    return divmod(payload, PAYLOAD_STRIDE)


def expected_tree(blocks: int, steps: int) -> list[tuple]:
    """The tree a stream of ``blocks`` blocks and ``steps`` steps must emit: nested
    ``(name, category, payload or None, children)`` tuples in emission order."""

    def expand(spec: RangeSpec, block: int | None) -> list[tuple]:
        reps = {"once": [None], "per-block": list(range(blocks)), "per-step": list(range(steps))}[spec.repeat]
        out = []
        for r in reps:
            b = r if spec.repeat == "per-block" else block
            s = r if spec.repeat == "per-step" else None
            payload = encode_payload(b, s) if spec.payload else None
            kids = [n for c in spec.children for n in expand(c, b)]
            out.append((spec.name, spec.category, payload, kids))
        return out

    return [n for s in _TREE for n in expand(s, None)]


# ---- the NVTX client: the `nvtx` package, else torch.cuda.nvtx, else none -------------------------

class _PackageNVTX:
    """The ``nvtx`` package: our own domain, a category per family, int64 payloads."""

    name = "nvtx"

    def __init__(self, pkg):
        self.domain = pkg.get_domain(DOMAIN)
        self.tool_attached = self.domain is not pkg._lib.dummy_domain
        # Fixed category ids in family order (the package numbers categories by first use).
        self.cat_ids = {fam: self.domain.get_category_id(fam) for fam in _COLORS} if self.tool_attached else {}

    def push(self, name: str, category: str, payload: int | None) -> None:
        self.domain.push_range(self.domain.get_event_attributes(name, _COLORS[category], self.cat_ids[category],
                                                                payload))

    def pop(self) -> None:
        self.domain.pop_range()


class _TorchNVTX:
    """torch.cuda.nvtx (a CUDA build of torch carries NVTX): default domain, bare names only."""

    name = "torch.cuda.nvtx"

    def __init__(self):
        self.tool_attached = bool(os.environ.get("NVTX_INJECTION64_PATH"))

    def push(self, name: str, category: str, payload: int | None) -> None:
        torch.cuda.nvtx.range_push(name)

    def pop(self) -> None:
        torch.cuda.nvtx.range_pop()


class _NoNVTX:
    name = "none"
    tool_attached = False

    def push(self, name: str, category: str, payload: int | None) -> None:
        pass

    def pop(self) -> None:
        pass


def _pick_client():
    want = os.environ.get("HALLOLIVE_NVTX_BACKEND", "auto").strip().lower()
    if want not in ("auto", "nvtx", "torch", "none"):
        raise ImportError(f"HALLOLIVE_NVTX_BACKEND={want!r}: expected auto, nvtx, torch or none")
    if want in ("auto", "nvtx"):
        try:
            import nvtx as pkg
        except ImportError:
            pkg = None
        if pkg is not None:
            return _PackageNVTX(pkg), None
        why = "the `nvtx` package is not installed"
    else:
        why = f"HALLOLIVE_NVTX_BACKEND={want}"
    if want in ("auto", "torch") and hasattr(torch._C, "_nvtx"):
        return _TorchNVTX(), why
    if want != "none":
        why += "; torch has no NVTX (a CPU build)"
    return _NoNVTX(), why


_client, _fallback_reason = _pick_client()
_TOOL_ATTACHED = _client.tool_attached


def describe() -> dict:
    """Which NVTX client emits the ranges and whether they are on (for logs and bench JSON)."""
    full = isinstance(_client, _PackageNVTX)
    return {"backend": _client.name, "domain": DOMAIN if full else None, "categories": full, "payloads": full,
            "tool_attached": _TOOL_ATTACHED, "enabled": _nvtx_on, "fallback_reason": _fallback_reason}


# ---- on/off state -------------------------------------------------------------------------------

_nvtx_wanted = os.environ.get("HALLOLIVE_NVTX", "1").strip().lower() not in ("0", "false", "off", "no")
_nvtx_on = _TOOL_ATTACHED and _nvtx_wanted
_timer: "StageTimer | None" = None
_suppressed = False
_emit = _nvtx_on            # NVTX or timer work to do (recomputed by _refresh)
_watch_torch = True          # ask torch whether a profiler records (False while suppressed)
_torch_profiling = torch._C._autograd._profiler_enabled


def _refresh() -> None:
    global _emit, _watch_torch
    _emit = (_nvtx_on or _timer is not None) and not _suppressed
    _watch_torch = not _suppressed


def enable_nvtx(on: bool = True) -> bool:
    """Turn our NVTX ranges on or off; returns whether they are now emitted (never without a tool)."""
    global _nvtx_wanted, _nvtx_on
    _nvtx_wanted = bool(on)
    _nvtx_on = _TOOL_ATTACHED and _nvtx_wanted
    _refresh()
    return _nvtx_on


def nvtx_enabled() -> bool:
    return _nvtx_on


@contextmanager
def suppressed():
    """No ranges (NVTX, torch) and no timing inside: for warm-up runs before the profiled one."""
    global _suppressed
    prev, _suppressed = _suppressed, True
    _refresh()
    try:
        yield
    finally:
        _suppressed = prev
        _refresh()


# ---- the helper ---------------------------------------------------------------------------------

class _Off:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


_OFF = _Off()


class _Range:
    __slots__ = ("name", "category", "block", "step", "payload", "rf", "token", "pushed")

    def __init__(self, name: str, block: int | None, step: int | None):
        spec = _SPECS.get(name)
        if spec is None:
            raise KeyError(f"stage {name!r} is not in the documented range tree "
                           f"({', '.join(_SPECS)}); add it to hallolive_rt/nvtx.py's docstring first")
        if (block is not None) != ("block" in spec.payload) or (step is not None) != ("step" in spec.payload):
            want = ", ".join(spec.payload) or "no block/step"
            raise ValueError(f"stage {name!r} takes {want}; got block={block}, step={step}")
        self.name, self.category, self.block, self.step = name, spec.category, block, step
        self.payload = None if block is None else encode_payload(block, step)
        self.rf = self.token = None
        self.pushed = False

    def __enter__(self):
        if _nvtx_on and not _suppressed:
            _client.push(self.name, self.category, self.payload)
            self.pushed = True
        if _watch_torch and _torch_profiling():
            # record_function's args string does not reach the Chrome trace; run_torch_session
            # writes block/step into the trace events afterwards (from its StageTimer).
            self.rf = torch.autograd.profiler.record_function(self.name)
            self.rf.__enter__()
        if _timer is not None and not _suppressed:
            self.token = (_timer, _timer._start(self.name, self.block, self.step))
        return None

    def __exit__(self, *exc):
        if self.token is not None:
            timer, idx = self.token
            timer._stop(idx)
        if self.rf is not None:
            self.rf.__exit__(None, None, None)
        if self.pushed:
            _client.pop()
        return None


def stage(name: str, block: int | None = None, step: int | None = None):
    """Context manager for one documented stage; free (a shared no-op) when nothing listens."""
    if _emit or (_watch_torch and _torch_profiling()):
        return _Range(name, block, step)
    return _OFF


# ---- stage timer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageRecord:
    name: str
    block: int | None
    step: int | None
    ms: float


@dataclass(frozen=True)
class StageStat:
    name: str
    count: int
    total_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


class StageTimer:
    """Per-stage times: CUDA events on the current stream (no host sync until ``records()``) when
    ``device`` is a CUDA device, else ``time.perf_counter``. Install with ``with timer: ...``.

    Stages entered while the current stream is capturing a CUDA graph are not timed (an event
    record there would become part of the graph)."""

    def __init__(self, device: torch.device | str | None = None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self._open: list[list] = []     # [name, block, step, start, end]
        self._prev: list[StageTimer | None] = []

    def __enter__(self) -> "StageTimer":
        global _timer
        self._prev.append(_timer)
        _timer = self
        _refresh()
        return self

    def __exit__(self, *exc):
        global _timer
        _timer = self._prev.pop()
        _refresh()
        return None

    def _start(self, name, block, step) -> int:
        if self.cuda:
            if torch.cuda.is_current_stream_capturing():
                return -1
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._open.append([name, block, step, ev, None])
        return len(self._open) - 1

    def _stop(self, idx: int) -> None:
        if idx < 0:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self._open[idx][4] = ev

    def records(self) -> list[StageRecord]:
        """Every timed stage in entry order (synchronizes the device once on GPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for name, block, step, t0, t1 in self._open:
            if t1 is None:
                continue
            ms = t0.elapsed_time(t1) if self.cuda else (t1 - t0) * 1e3
            out.append(StageRecord(name, block, step, ms))
        return out

    def summary(self) -> list[StageStat]:
        """One row per stage name, in order of first appearance."""
        groups: dict[str, list[float]] = {}
        for r in self.records():
            groups.setdefault(r.name, []).append(r.ms)
        return [StageStat(n, len(v), sum(v), sum(v) / len(v), min(v), max(v)) for n, v in groups.items()]

    def reset(self) -> None:
        self._open.clear()


