"""The GPU session's ncu entries: Nsight Compute on one kernel target of ``profiles/ncu.toml`` (its sections,
its NVTX range, the command line ``hallolive_rt.runtime.profiling.build_command`` builds for
``hallolive-rt profile --session ncu --target T``), attached to bench/ncu_target.py instead of ``stream``
(the same block loop without the text encoder and the MP4 writer), with a smaller ``launch-count`` and the
NVTX filter of the client the program will use (the ``nvtx`` package pushes into the ``hallolive-rt``
domain, torch's fallback into the default one). The JSON holds the command, ncu's exit code and output
tail, the ranges the profiled blocks entered, and a per-kernel summary read back from the report
(``ncu --import R --csv --page details``: duration, SM / memory / DRAM throughput, occupancy; cold caches,
base clocks, as the preset asks); the report itself goes into ``<card>-ncu-reports.zip`` while that stays
under 15 MiB. Where ncu is not installed the entry is "skipped" after running the program alone (so its
range check still runs)."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import deque
from pathlib import Path

__all__ = ["run_ncu", "nvtx_filter", "summarize_csv", "ZIP_LIMIT"]

REPO = Path(__file__).resolve().parents[1]
ZIP_LIMIT = 15 * 2**20  # each returned file stays under 16 MiB
_UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
_METRICS = {"Duration": "duration_us", "Compute (SM) Throughput": "sm_pct", "Memory Throughput": "mem_pct",
            "DRAM Throughput": "dram_pct", "Achieved Occupancy": "occupancy_pct",
            "Registers Per Thread": "registers"}


def nvtx_filter(range_name: str, client: str) -> str:
    """``--nvtx-include`` for ``range_name`` as the program's NVTX client pushes it."""
    from hallolive_rt.runtime.profiling import ncu_nvtx_filter

    if client == "nvtx":
        return ncu_nvtx_filter(range_name)
    return f"regex:{range_name.replace('/', '.')}/"  # torch.cuda.nvtx: the default domain, no "domain@"


def _num(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarize_csv(text: str, top: int = 15) -> dict:
    """Per-kernel figures of ncu's details page in CSV: every kernel's duration and throughputs, then the
    kernels grouped by name, largest total duration first."""
    kernels: dict[str, dict] = {}
    start = text.find('"ID"')  # ncu may print ==WARNING== lines before the header
    for row in csv.DictReader(io.StringIO(text[max(start, 0):])):
        kid, metric = row.get("ID"), row.get("Metric Name")
        if kid is None or metric not in _METRICS:
            continue
        k = kernels.setdefault(kid, {"name": (row.get("Kernel Name") or "?")[:200]})
        val = _num(row.get("Metric Value", ""))
        if metric == "Duration" and val is not None:
            val *= _UNIT_US.get((row.get("Metric Unit") or "").strip(), float("nan"))
        k[_METRICS[metric]] = val
    groups: dict[str, dict] = {}
    for k in kernels.values():
        g = groups.setdefault(k["name"], {"name": k["name"], "count": 0, "total_us": 0.0, "_w": {}})
        g["count"] += 1
        d = k.get("duration_us") or 0.0
        g["total_us"] += d
        for key in ("sm_pct", "mem_pct", "dram_pct", "occupancy_pct"):
            if k.get(key) is not None:
                w = g["_w"].setdefault(key, [0.0, 0.0])
                w[0], w[1] = w[0] + k[key] * d, w[1] + d
    rows = []
    for g in sorted(groups.values(), key=lambda g: -g["total_us"]):
        w = g.pop("_w")
        rows.append({**g, "mean_us": g["total_us"] / g["count"],
                     **{f"{key}_weighted": (s / t if t else None) for key, (s, t) in w.items()}})
    total = sum(g["total_us"] for g in rows)
    return {"kernels_profiled": len(kernels), "distinct_kernels": len(rows), "total_us": total,
            "weighting": "throughput and occupancy averaged over a group's kernels, weighted by duration",
            "top": rows[:top]}


def _with_flags(head: list[str], flags: dict) -> list[str]:
    """``head`` (ncu and its ``--key value`` flags) with each of ``flags`` set: its value replaced, or added."""
    out = list(head)
    for key, value in flags.items():
        if f"--{key}" in out:
            out[out.index(f"--{key}") + 1] = str(value)
        else:
            out += [f"--{key}", str(value)]
    return out


def _archive(rep: Path, zip_path: Path) -> dict:
    """Add ``rep`` to the session's zip of reports unless the zip would pass ZIP_LIMIT."""
    trial = zip_path.with_name(zip_path.name + ".tmp")  # beside it: os.replace stays on one file system
    if zip_path.exists():
        shutil.copyfile(zip_path, trial)
    with zipfile.ZipFile(trial, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(rep, rep.name)
    size = trial.stat().st_size
    if size > ZIP_LIMIT:
        trial.unlink()
        return {"archived": False, "reason": f"the zip would be {size / 2**20:.1f} MiB (limit "
                                             f"{ZIP_LIMIT / 2**20:.0f} MiB): the report stays out"}
    os.replace(trial, zip_path)
    return {"archived": True, "zip": zip_path.name, "zip_bytes": size}


def _run_tee(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """Run ``cmd``, echoing its output (the session log keeps it) and keeping its last lines; past
    ``timeout`` it gets SIGTERM (ncu ends its target), then SIGKILL; the exit code is then None."""
    t0, tail, expired = time.perf_counter(), deque(maxlen=60), []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

    def stop() -> None:
        expired.append(True)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    timer = threading.Timer(timeout, stop)
    timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
        rc = proc.wait()
    finally:
        timer.cancel()
    return (None if expired else rc), "\n".join(tail), time.perf_counter() - t0


def run_ncu(o: dict, emit, *, card: str, out_dir: Path, box_s: float | None, dry_run: bool, failed,
            skipped) -> None:
    """One ncu entry (see the module docstring). ``failed`` / ``skipped``: the phase's exception types. Without
    ncu, the dry run still runs the program alone (its range check); a GPU session skips at once."""
    from hallolive_rt import nvtx
    from hallolive_rt.runtime import profiling

    target = o["target"]
    preset = profiling.load_session_preset("ncu")
    spec = preset.get_target(target)
    client = nvtx.describe()["backend"]
    flags = {"nvtx-include": nvtx_filter(spec["nvtx_range"], client),
             "launch-count": o.get("launch_count") or preset.flags.get("launch-count")}
    exe = profiling.find_profiler("ncu")
    res: dict = {"target": target, "description": spec.get("description"), "nvtx_range": spec["nvtx_range"],
                 "nvtx_client": client, "nvtx_include": flags["nvtx-include"], "launch_count": flags["launch-count"],
                 "ncu": exe, "program": "bench/ncu_target.py (bench_main e2e, random weights, no text encoder, "
                                        "no MP4), in place of `stream` under `hallolive-rt profile --session ncu`"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target_json = work / "target.json"
        app = [sys.executable, str(REPO / "bench" / "ncu_target.py"), "--preset", o["preset"], "--device",
               o["device"], "--backend", o.get("backends", ["eager"])[0], "--blocks", str(o.get("blocks", 2)),
               "--warmup-blocks", str(o.get("warmup_blocks", 1)), "--out", str(target_json)]
        cmd = profiling.build_command("ncu", preset, [], out_dir=work, target=target, warmup_runs=0)
        cmd = _with_flags(cmd[:cmd.index(sys.executable)], flags) + app  # ncu and its flags, then the program
        res["command"] = shlex.join(cmd)
        emit(res)
        env = {**os.environ, "HALLOLIVE_NVTX": "1"}
        budget = float(box_s or 600) - 50  # left for the phase's start, the report's import and the archive
        if exe is None:
            res["reason"] = profiling.missing_profiler_message("ncu").splitlines()[0]
            emit(res)
            if not dry_run:
                raise skipped(f"ncu not found: {res['reason']}")
            rc, res["output_tail"], res["wall_s"] = _run_tee(app, budget, env)  # the program alone: its range check
        else:
            rc, res["output_tail"], res["wall_s"] = _run_tee(cmd, budget, env)
        res["exit_code"] = rc
        if target_json.exists():
            res["target_run"] = json.loads(target_json.read_text())
        entered = (res.get("target_run") or {}).get("ranges_entered", {}).get(spec["nvtx_range"], 0)
        res["range_entered"] = entered
        rep = work / f"{preset.output.format(target=target)}.ncu-rep"
        if exe is not None and rep.exists():
            res["report"] = {"name": rep.name, "bytes": rep.stat().st_size}
            irc, text, _ = _capture([exe, "--import", str(rep), "--csv", "--page", "details"], 30)
            res["summary"] = summarize_csv(text) if irc == 0 else {"error": text[-2000:]}
            res["report"].update(_archive(rep, out_dir / f"{card}-ncu-reports.zip"))
        emit(res)
    if rc is None:
        raise failed(f"{'ncu' if exe else 'the program'} ran past the entry's {budget:.0f} s and was killed")
    if rc != 0:
        raise failed(f"{'ncu' if exe else 'the program'} exit code {rc}: {res['output_tail'][-600:]}")
    if not entered:
        raise failed(f"the profiled blocks never entered the range {spec['nvtx_range']!r}")
    if exe is None:
        raise skipped(f"ncu not found ({res['reason']}); the program ran alone and entered "
                      f"{spec['nvtx_range']!r} {entered} times")
    if not (res.get("summary") or {}).get("kernels_profiled"):
        raise failed(f"ncu profiled no kernel with --nvtx-include {flags['nvtx-include']} (the program entered "
                     f"the range {entered} times, NVTX client {client})")


def _capture(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout if p.returncode == 0 else p.stdout + p.stderr, time.perf_counter() - t0
    except (OSError, subprocess.SubprocessError) as e:
        return -1, f"{type(e).__name__}: {e}", time.perf_counter() - t0
