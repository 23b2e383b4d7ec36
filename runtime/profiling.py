"""Profiling sessions of one stream: ``build_command`` turns a preset of ``profiles/nsys.toml`` or
``profiles/ncu.toml`` into the Nsight command line that runs ``hallolive-rt stream`` (after its silent warm-up
runs, so the capture sees a warm stream), ``missing_profiler_message`` says where a missing Nsight tool comes
from, and ``run_torch_session`` runs the same stream under the PyTorch profiler, which needs nothing
installed. All three see the ranges of ``hallolive_rt.nvtx``; the CLI's ``profile`` command picks one."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from hallolive_rt.nvtx import DOMAIN, RANGES, StageRecord, StageTimer, encode_payload, suppressed

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["SESSIONS", "PresetError", "SessionPreset", "StageRow", "StageTable", "build_command", "find_profiler",
           "load_session_preset", "missing_profiler_message", "ncu_nvtx_filter", "run_torch_session"]

SESSIONS = ("nsys", "ncu", "torch")


class PresetError(ValueError):
    """A malformed Nsight session preset."""


@dataclass(frozen=True)
class SessionPreset:
    """``[<tool>]`` of a preset file: the tool's ``flags`` as written there, the report's file name (under
    the output folder; ``{target}`` for ncu), the silent warm-up streams, and ncu's kernel targets."""
    tool: str
    flags: dict
    output: str
    warmup_runs: int
    target: str | None = None
    targets: dict = field(default_factory=dict)  # name -> {description, nvtx_range[, kernel_regex]}

    def get_target(self, name: str | None) -> dict:
        name = name or self.target
        if name not in self.targets:
            raise PresetError(f"unknown ncu target {name!r}; choose one of {', '.join(self.targets)}")
        return self.targets[name]


def load_session_preset(tool: str, path: str | Path | None = None) -> SessionPreset:
    """Read ``profiles/<tool>.toml`` (or ``path``); unknown keys and undocumented ranges are refused."""
    if tool not in ("nsys", "ncu"):
        raise PresetError(f"no preset file for session {tool!r} (nsys and ncu have one)")
    p = Path(path) if path is not None else Path(str(resources.files("hallolive_rt.profiles"))) / f"{tool}.toml"
    with open(p, "rb") as fh:
        data = tomllib.load(fh)
    if list(data) != [tool]:
        raise PresetError(f"{p}: expected the one table [{tool}], found {', '.join(data) or 'none'}")
    sec = dict(data[tool])
    extra = set(sec) - {"flags", "output", "warmup_runs", "target", "targets"}
    if extra or not {"flags", "output", "warmup_runs"} <= set(sec):
        raise PresetError(f"{p}: [{tool}] needs flags, output, warmup_runs; unknown: {sorted(extra) or '-'}")
    preset = SessionPreset(tool, **sec)
    ranges = [t.get("nvtx_range") for t in preset.targets.values()]
    if "nvtx-capture" in preset.flags:
        ranges.append(preset.flags["nvtx-capture"].removesuffix(f"@{DOMAIN}"))
    if any(r not in RANGES for r in ranges):
        raise PresetError(f"{p}: {', '.join(str(r) for r in ranges if r not in RANGES)} is not a documented range")
    if tool == "ncu":
        preset.get_target(None)
    return preset


def ncu_nvtx_filter(range_name: str) -> str:
    """ncu ``--nvtx-include`` for a push/pop range of our domain: ncu reads '/' as nesting (and a trailing '/'
    as push/pop), so each slash of the name becomes the regex '.' (no other range name matches it)."""
    return f"regex:{DOMAIN}@{range_name.replace('/', '.')}/"


def _flags(flags: dict, joined: bool) -> list[str]:
    """``--key=value`` (nsys) or ``--key value`` (ncu) per entry; a list repeats the flag, ``true`` is a switch."""
    out: list[str] = []
    for key, value in flags.items():
        for v in value if isinstance(value, list) else [value]:
            out += [f"--{key}"] if v is True else [f"--{key}={v}"] if joined else [f"--{key}", str(v)]
    return out


def build_command(session: str, preset: SessionPreset | str | Path | None = None, stream_args: Sequence[str] = (),
                  *, out_dir: str | Path = ".", target: str | None = None, warmup_runs: int | None = None) -> list[str]:
    """argv that runs ``hallolive-rt stream <stream_args>`` under nsys or ncu with ``preset`` (default
    ``profiles/<session>.toml``); ``target`` picks an ncu kernel target, ``warmup_runs`` overrides the preset's."""
    if not isinstance(preset, SessionPreset):
        preset = load_session_preset(session, preset)
    flags = dict(preset.flags)
    if session == "ncu":
        name = target or preset.target
        t = preset.get_target(name)
        flags.update({"nvtx": True, "nvtx-include": ncu_nvtx_filter(t["nvtx_range"]),
                      "export": str(Path(out_dir) / preset.output.format(target=name))})
        if "kernel_regex" in t:
            flags["kernel-name"] = f"regex:{t['kernel_regex']}"
    else:
        flags["output"] = str(Path(out_dir) / preset.output)
    warm = preset.warmup_runs if warmup_runs is None else warmup_runs
    app = [sys.executable, "-m", "hallolive_rt.cli", "stream", *stream_args]
    app += ["--warmup-runs", str(warm)] if warm > 0 else []
    head = [find_profiler(session) or session] + (["profile"] if session == "nsys" else [])
    return head + _flags(flags, joined=session == "nsys") + app


# Where each Nsight CLI is looked for and where it comes from.
_TOOLS = {
    "nsys": ("Nsight Systems", "nsight-systems",
             ["/usr/local/cuda/bin/nsys", "/usr/local/cuda-*/bin/nsys", "/opt/nvidia/nsight-systems/*/bin/nsys"], ""),
    "ncu": ("Nsight Compute", "nsight-compute",
            ["/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"],
            " ncu also needs the GPU performance counters (root, or the driver option "
            "NVreg_RestrictProfilingToAdminUsers=0), which shared machines often withhold."),
}


def find_profiler(session: str) -> str | None:
    """Path of the nsys / ncu binary: PATH first, then the usual install folders; None if absent."""
    if session not in _TOOLS:
        return None
    if found := shutil.which(session):
        return found
    for pattern in _TOOLS[session][2]:
        hits = sorted(glob.glob(pattern))
        if hits and os.access(hits[-1], os.X_OK):
            return hits[-1]
    return None


def missing_profiler_message(session: str, command: Sequence[str] | None = None) -> str:
    """What the user sees when ``session``'s profiler is not installed: where it comes from, the torch session
    instead, and the command to run where it is installed."""
    product, pkg, globs, note = _TOOLS[session]
    msg = (f"`{session}` ({product} CLI) was not found (looked in: {', '.join(['PATH', *globs])}).\n"
           f"It comes from the CUDA toolkit's `cuda-{pkg}-<ver>` / `{pkg}-<ver>` apt packages (NVIDIA's CUDA "
           f"repository), a CUDA *devel* container image, or the standalone installer at "
           f"https://developer.nvidia.com/{pkg}.{note}\n"
           f"Without it, profile the same stream with the PyTorch profiler, which needs nothing installed:\n"
           f"    hallolive-rt profile --session torch <the same stream options>\n"
           f"It writes a Chrome/Perfetto trace (open in https://ui.perfetto.dev) with the same range names "
           f"and prints a per-stage table.")
    if command:
        msg += f"\nOn a machine with {product}, the command would be:\n    {shlex.join(command)}"
    return msg


class StageRow(NamedTuple):
    name: str
    count: int
    total_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


@dataclass(frozen=True)
class StageTable:
    """Per-stage times of one profiled stream: one row per stage that ran, in the order of ``RANGES``, and
    the ``session`` range's total (the share column)."""
    rows: tuple[StageRow, ...]
    session_ms: float

    @classmethod
    def from_records(cls, records: Sequence[StageRecord]) -> "StageTable":
        ms: dict[str, list[float]] = {n: [] for n in RANGES}
        for r in records:
            ms[r.name].append(r.ms)
        rows = tuple(StageRow(n, len(v), sum(v), sum(v) / len(v), min(v), max(v)) for n, v in ms.items() if v)
        return cls(rows, sum(ms["session"]))

    def __str__(self) -> str:
        head = f"{'stage':<14}{'count':>7}{'total ms':>12}{'mean ms':>11}{'min ms':>10}{'max ms':>10}{'% session':>11}"
        lines = [head, "-" * len(head)]
        for name, count, *times in self.rows:
            share = f"{100 * times[0] / self.session_ms:.1f}" if self.session_ms > 0 else "-"
            lines.append(f"{name:<14}{count:>7}" + "".join(f"{t:>{w}.3f}" for t, w in zip(times, (12, 11, 10, 10)))
                         + f"{share:>11}")
        return "\n".join(lines)


def _annotate_trace(path: Path, records: Sequence[StageRecord]) -> None:
    """Write block / step / payload into our ranges' trace events (record_function carries the name only):
    the n-th event of a name, in time order, is the n-th timed stage of that name."""
    trace = json.loads(path.read_text())
    for cat in ("user_annotation", "gpu_user_annotation"):
        events = sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == cat and e.get("name") in RANGES),
                        key=lambda e: e.get("ts", 0))
        for name in RANGES:
            stages = [r for r in records if r.name == name]
            for e, r in zip((e for e in events if e["name"] == name), stages):
                if r.block is not None:
                    step = {} if r.step is None else {"step": r.step}
                    e.setdefault("args", {}).update(block=r.block, payload=encode_payload(r.block, r.step), **step)
    trace.setdefault("otherData", {})["hallolive_rt_domain"] = DOMAIN
    path.write_text(json.dumps(trace))


def run_torch_session(run_fn: Callable[[], object], out_dir: str | Path, *, warmup_runs: int = 0,
                      device: torch.device | str | None = None,
                      name: str = "hallolive-rt-torch") -> tuple[Path, StageTable]:
    """Run ``run_fn`` (one stream) ``warmup_runs`` times silently, then once under the PyTorch profiler;
    returns the Chrome/Perfetto trace ``out_dir/<name>.json`` (our range names, with block/step args) and
    the per-stage table, timed by the stage timer while the profiler records (its overhead included)."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    timer = StageTimer(device if device is not None else ("cuda" if cuda else "cpu"))
    for _ in range(warmup_runs):
        with suppressed():
            run_fn()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        with timer:
            run_fn()
        if cuda:
            torch.cuda.synchronize()
    trace = out / f"{name}.json"
    prof.export_chrome_trace(str(trace))
    records = timer.records()
    _annotate_trace(trace, records)
    return trace, StageTable.from_records(records)
