"""Profiling sessions: Nsight Systems / Nsight Compute command lines built from the presets in
``profiles/nsys.toml`` and ``profiles/ncu.toml``, a clear explanation where a profiler is missing, and a
PyTorch-profiler session that needs nothing installed.

The three sessions see the same ranges (``hallolive_rt.nvtx``): nsys and ncu through NVTX, the torch
session through ``record_function``. This module only builds and runs; ``hallolive-rt profile`` (the
CLI) passes the stream.

The profiled program is ``python -m hallolive_rt.cli stream <stream args> [--warmup-runs N]``: the
stream command runs N streams under ``hallolive_rt.nvtx.suppressed()`` first (see
``run_with_warmup``), so the first ``session`` range nsys sees is a warm one.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch

from hallolive_rt.nvtx import DOMAIN, StageStat, StageTimer, encode_payload, range_names, suppressed

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "SESSIONS", "NcuPreset", "NcuTarget", "NsysPreset", "PresetError", "ProfilerMissing", "StageTable",
    "build_command", "find_profiler", "load_session_preset", "missing_profiler_message",
    "ncu_nvtx_filter", "require_profiler", "run_torch_session", "run_with_warmup",
]

SESSIONS = ("nsys", "ncu", "torch")


class PresetError(ValueError):
    """A malformed Nsight session preset."""


class ProfilerMissing(RuntimeError):
    """nsys / ncu is not installed; the message says where it comes from and offers the torch session."""


# ---- presets as data ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NsysPreset:
    trace: tuple[str, ...]
    capture_range: str
    nvtx_capture: str
    capture_range_end: str
    env: tuple[tuple[str, str], ...]
    delay_s: float
    duration_s: float
    cuda_graph_trace: str
    cuda_memory_usage: bool
    sample: str
    cpuctxsw: str
    stats: bool
    output: str
    force_overwrite: bool
    warmup_runs: int


@dataclass(frozen=True)
class NcuTarget:
    name: str
    description: str
    nvtx_range: str
    kernel_regex: str | None = None


@dataclass(frozen=True)
class NcuPreset:
    target: str
    sections: tuple[str, ...]
    launch_count: int
    launch_skip: int
    graph_profiling: str
    replay_mode: str
    cache_control: str
    clock_control: str
    target_processes: str
    kernel_name_base: str
    output: str
    force_overwrite: bool
    warmup_runs: int
    targets: tuple[NcuTarget, ...]

    def get_target(self, name: str | None) -> NcuTarget:
        name = name or self.target
        for t in self.targets:
            if t.name == name:
                return t
        raise PresetError(f"unknown ncu target {name!r}; choose one of {', '.join(t.name for t in self.targets)}")


def _check_keys(sec: dict, cls, src: str, skip=()) -> None:
    names = {f.name for f in fields(cls)} - set(skip)
    missing, extra = sorted(names - set(sec)), sorted(set(sec) - names - set(skip))
    if missing or extra:
        raise PresetError(f"{src}: [{cls.__name__}] missing {missing or '-'}; unknown {extra or '-'}")


def load_session_preset(session: str, path: str | Path | None = None) -> NsysPreset | NcuPreset:
    """Read ``profiles/<session>.toml`` (or ``path``) into a typed preset; unknown keys are refused."""
    if session not in ("nsys", "ncu"):
        raise PresetError(f"no preset file for session {session!r} (nsys and ncu have one)")
    p = Path(path) if path is not None else Path(str(resources.files("hallolive_rt.profiles"))) / f"{session}.toml"
    with open(p, "rb") as fh:
        data = tomllib.load(fh)
    if "stream" in data:
        raise PresetError(f"{p}: a [stream] table makes this a shape preset, not an Nsight preset")
    if session not in data:
        raise PresetError(f"{p}: missing table [{session}]")
    sec = dict(data[session])
    src = str(p)
    if session == "nsys":
        sec["trace"] = tuple(sec.get("trace", ()))
        sec["env"] = tuple(sorted((str(k), str(v)) for k, v in sec.get("env", {}).items()))
        _check_keys(sec, NsysPreset, src)
        preset = NsysPreset(**sec)
        if preset.nvtx_capture not in range_names():
            raise PresetError(f"{src}: nvtx_capture {preset.nvtx_capture!r} is not a documented range")
        return preset
    targets = tuple(NcuTarget(name=k, **v) for k, v in sec.pop("targets", {}).items())
    sec["sections"] = tuple(sec.get("sections", ()))
    _check_keys(sec, NcuPreset, src, skip=("targets",))
    preset = NcuPreset(targets=targets, **sec)
    for t in targets:
        if t.nvtx_range not in range_names():
            raise PresetError(f"{src}: target {t.name!r} names undocumented range {t.nvtx_range!r}")
    preset.get_target(None)
    return preset


# ---- command lines ------------------------------------------------------------------------------

def ncu_nvtx_filter(range_name: str, domain: str = DOMAIN) -> str:
    """ncu ``--nvtx-include`` expression for the push/pop range ``range_name`` of ``domain``.

    In ncu's filter syntax '/' separates nested push/pop ranges and a trailing '/' marks a push/pop
    range, so a literal 'dit/step' would read as range 'step' inside range 'dit'. The expression uses
    ncu's ``regex:`` form with '.' standing for each slash of the name (tests/test_profiling.py checks
    that no other documented range name matches it)."""
    return f"regex:{domain}@{range_name.replace('/', '.')}/"


def default_app(stream_args: Sequence[str], warmup_runs: int) -> list[str]:
    app = [sys.executable, "-m", "hallolive_rt.cli", "stream", *stream_args]
    if warmup_runs > 0:
        app += ["--warmup-runs", str(warmup_runs)]
    return app


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def build_command(session: str, preset: NsysPreset | NcuPreset | str | Path | None = None,
                  stream_args: Sequence[str] = (), *, out_dir: str | Path = ".", target: str | None = None,
                  app: Sequence[str] | None = None, warmup_runs: int | None = None) -> list[str]:
    """argv that runs the stream under nsys or ncu with ``preset`` (default: ``profiles/<session>.toml``).

    ``app`` replaces the profiled program (default ``default_app(stream_args, warmup_runs)``, the preset's
    ``warmup_runs`` unless given); ``target`` picks an ncu target (``dit``, ``attention``, ``gemm``,
    ``context``, ``vae``, ``audio``)."""
    if session not in ("nsys", "ncu"):
        raise ValueError(f"build_command: session must be 'nsys' or 'ncu', got {session!r}")
    if preset is None or isinstance(preset, (str, Path)):
        preset = load_session_preset(session, preset)
    exe = find_profiler(session) or session
    out = Path(out_dir)
    if session == "nsys":
        assert isinstance(preset, NsysPreset)
        cmd = [exe, "profile", f"--trace={','.join(preset.trace)}"]
        if preset.capture_range == "nvtx":
            cmd += ["--capture-range=nvtx", f"--nvtx-capture={preset.nvtx_capture}@{DOMAIN}",
                    f"--capture-range-end={preset.capture_range_end}"]
        elif preset.capture_range != "none":
            cmd += [f"--capture-range={preset.capture_range}"]
        cmd += [f"--env-var={k}={v}" for k, v in preset.env]
        if preset.delay_s > 0:
            cmd += [f"--delay={_num(preset.delay_s)}"]
        if preset.duration_s > 0:
            cmd += [f"--duration={_num(preset.duration_s)}"]
        cmd += [f"--cuda-graph-trace={preset.cuda_graph_trace}",
                f"--cuda-memory-usage={str(preset.cuda_memory_usage).lower()}",
                f"--sample={preset.sample}", f"--cpuctxsw={preset.cpuctxsw}",
                f"--stats={str(preset.stats).lower()}",
                f"--force-overwrite={str(preset.force_overwrite).lower()}",
                f"--output={out / preset.output}"]
    else:
        assert isinstance(preset, NcuPreset)
        t = preset.get_target(target)
        cmd = [exe, "--nvtx", "--nvtx-include", ncu_nvtx_filter(t.nvtx_range)]
        if t.kernel_regex:
            cmd += ["--kernel-name", f"regex:{t.kernel_regex}"]
        for s in preset.sections:
            cmd += ["--section", s]
        cmd += ["--launch-skip", str(preset.launch_skip), "--launch-count", str(preset.launch_count),
                "--graph-profiling", preset.graph_profiling, "--replay-mode", preset.replay_mode,
                "--cache-control", preset.cache_control, "--clock-control", preset.clock_control,
                "--target-processes", preset.target_processes,
                "--kernel-name-base", preset.kernel_name_base,
                "--export", str(out / preset.output.format(target=t.name))]
        if preset.force_overwrite:
            cmd += ["--force-overwrite"]
    warm = preset.warmup_runs if warmup_runs is None else warmup_runs
    return cmd + list(app if app is not None else default_app(stream_args, warm))


# ---- missing profilers --------------------------------------------------------------------------

_WHERE = {
    "nsys": dict(
        product="Nsight Systems",
        globs=["/usr/local/cuda/bin/nsys", "/usr/local/cuda-*/bin/nsys", "/opt/nvidia/nsight-systems/*/bin/nsys"],
        source=("the CUDA toolkit's `cuda-nsight-systems-<ver>` / `nsight-systems-<ver>` apt packages "
                "(NVIDIA's CUDA repository), a CUDA *devel* container image, or the standalone installer "
                "at https://developer.nvidia.com/nsight-systems"),
        note=""),
    "ncu": dict(
        product="Nsight Compute",
        globs=["/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"],
        source=("the CUDA toolkit's `cuda-nsight-compute-<ver>` / `nsight-compute-<ver>` apt packages "
                "(NVIDIA's CUDA repository), a CUDA *devel* container image, or the standalone installer "
                "at https://developer.nvidia.com/nsight-compute"),
        note=(" ncu also needs access to the GPU performance counters (root, or the driver option "
              "NVreg_RestrictProfilingToAdminUsers=0), which shared machines often withhold.")),
}


def find_profiler(session: str) -> str | None:
    """Path of the nsys / ncu binary: PATH first, then the usual install folders; None if absent."""
    if session not in _WHERE:
        return None
    found = shutil.which(session)
    if found:
        return found
    for pattern in _WHERE[session]["globs"]:
        hits = sorted(glob.glob(pattern))
        if hits and os.access(hits[-1], os.X_OK):
            return hits[-1]
    return None


def missing_profiler_message(session: str, command: Sequence[str] | None = None) -> str:
    """What the user sees when ``session``'s profiler is not installed."""
    w = _WHERE[session]
    looked = ", ".join(["PATH", *w["globs"]])
    msg = (f"`{session}` ({w['product']} CLI) was not found (looked in: {looked}).\n"
           f"It comes from {w['source']}.{w['note']}\n"
           f"Without it, profile the same stream with the PyTorch profiler, which needs nothing installed:\n"
           f"    hallolive-rt profile --session torch <the same stream options>\n"
           f"It writes a Chrome/Perfetto trace (open in https://ui.perfetto.dev) with the same range names "
           f"and prints a per-stage table.")
    if command:
        msg += f"\nOn a machine with {w['product']}, the command would be:\n    {shlex.join(command)}"
    return msg


def require_profiler(session: str) -> str:
    path = find_profiler(session)
    if path is None:
        raise ProfilerMissing(missing_profiler_message(session))
    return path


# ---- torch session ------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageTable:
    """Per-stage summary of one profiled stream: one row per documented stage that ran."""
    rows: tuple[StageStat, ...]
    session_ms: float

    @classmethod
    def from_stats(cls, stats: Sequence[StageStat]) -> "StageTable":
        order = {n: i for i, n in enumerate(range_names())}
        rows = tuple(sorted(stats, key=lambda s: order.get(s.name, len(order))))
        session = next((s.total_ms for s in rows if s.name == "session"), 0.0)
        return cls(rows, session)

    def render(self) -> str:
        head = f"{'stage':<14}{'count':>7}{'total ms':>12}{'mean ms':>11}{'min ms':>10}{'max ms':>10}{'% session':>11}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            share = f"{100 * r.total_ms / self.session_ms:.1f}" if self.session_ms > 0 else "-"
            lines.append(f"{r.name:<14}{r.count:>7}{r.total_ms:>12.3f}{r.mean_ms:>11.3f}"
                         f"{r.min_ms:>10.3f}{r.max_ms:>10.3f}{share:>11}")
        return "\n".join(lines)

    __str__ = render

    def to_dict(self) -> dict:
        return {"session_ms": self.session_ms,
                "stages": [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.rows]}


def run_with_warmup(run_fn: Callable[[], object], warmup_runs: int) -> object:
    """Run ``warmup_runs`` streams with every range suppressed, then the one that is profiled."""
    for _ in range(warmup_runs):
        with suppressed():
            run_fn()
    return run_fn()


def _annotate_trace(path: Path, records) -> None:
    """Add block / step / payload args to our ranges in the Chrome trace: record_function carries only
    the name, and the n-th trace event of a name is the n-th timed stage of that name."""
    with open(path) as fh:
        trace = json.load(fh)
    by_name: dict[str, list] = {}
    for r in records:
        by_name.setdefault(r.name, []).append(r)
    for cat in ("user_annotation", "gpu_user_annotation"):
        events: dict[str, list[dict]] = {}
        for e in trace.get("traceEvents", []):
            if e.get("cat") == cat and e.get("name") in by_name:
                events.setdefault(e["name"], []).append(e)
        for name, evs in events.items():
            evs.sort(key=lambda e: e.get("ts", 0))
            for e, r in zip(evs, by_name[name]):
                if r.block is not None:
                    e.setdefault("args", {}).update(
                        block=r.block, payload=encode_payload(r.block, r.step),
                        **({} if r.step is None else {"step": r.step}))
    trace.setdefault("otherData", {})["hallolive_rt_domain"] = DOMAIN
    with open(path, "w") as fh:
        json.dump(trace, fh)


def run_torch_session(run_fn: Callable[[], object], out_dir: str | Path, *, warmup_runs: int = 0,
                      device: torch.device | str | None = None,
                      name: str = "hallolive-rt-torch") -> tuple[Path, StageTable]:
    """Run ``run_fn`` (one stream) under the PyTorch profiler after ``warmup_runs`` silent runs.

    Returns the Chrome/Perfetto trace path (``out_dir/<name>.json``, the same range names as NVTX,
    with block/step args) and the per-stage table, timed with CUDA events on GPU (perf_counter on
    CPU) while the profiler records, so the table includes the profiler's own overhead."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    timer = StageTimer(device if device is not None else ("cuda" if cuda else "cpu"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(warmup_runs):
        with suppressed():
            run_fn()
    with profile(activities=activities) as prof:
        with timer:
            run_fn()
        if cuda:
            torch.cuda.synchronize()
    trace = out / f"{name}.json"
    prof.export_chrome_trace(str(trace))
    records = timer.records()
    _annotate_trace(trace, records)
    return trace, StageTable.from_stats(timer.summary())
