"""Profiling sessions: the nsys / ncu command lines built from profiles/nsys.toml and ncu.toml (flags
present, capture range named, sections listed), the explanation when a profiler is missing, and the torch
session's trace (valid JSON, every range with its block/step) and per-stage table."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from hallolive_rt import nvtx as hn
from hallolive_rt.profile import list_profiles
from hallolive_rt.runtime import profiling as prof
from tests.test_nvtx import BLOCKS, STEPS, synthetic_stream

STREAM_ARGS = ["--preset", "tiny", "--blocks", "2"]


def _flag(cmd: list[str], name: str) -> str:
    """Value of ``--name=value`` or ``--name value`` in ``cmd``."""
    for i, a in enumerate(cmd):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return cmd[i + 1]
    raise AssertionError(f"{name} missing from {shlex.join(cmd)}")


def test_nsight_presets_are_not_shape_presets():
    assert "nsys" not in list_profiles() and "ncu" not in list_profiles()
    assert prof.load_session_preset("nsys").tool == "nsys" and prof.load_session_preset("ncu").target == "dit"


def test_nsys_command_from_preset(tmp_path):
    cmd = prof.build_command("nsys", None, STREAM_ARGS, out_dir=tmp_path)
    assert cmd[1] == "profile" and cmd[0].endswith("nsys")
    assert set(_flag(cmd, "--trace").split(",")) == {"cuda", "nvtx", "osrt", "cudnn", "cublas"}
    assert _flag(cmd, "--capture-range") == "nvtx"
    assert _flag(cmd, "--nvtx-capture") == "session@hallolive-rt"   # warm-up and set-up excluded
    assert _flag(cmd, "--capture-range-end") == "stop-shutdown"
    assert _flag(cmd, "--env-var") == "NSYS_NVTX_PROFILER_REGISTER_ONLY=0"
    assert _flag(cmd, "--cuda-graph-trace") == "node"
    assert _flag(cmd, "--output") == str(tmp_path / "hallolive-rt-nsys")
    assert "--delay" not in " ".join(cmd) and "--duration" not in " ".join(cmd)   # not in the preset
    # the profiled program: the stream with the caller's options and one silent warm-up run
    app = cmd[cmd.index("-m") - 1:]
    assert app[1:4] == ["-m", "hallolive_rt.cli", "stream"]
    assert app[4:8] == STREAM_ARGS and app[-2:] == ["--warmup-runs", "1"]


def test_preset_flags_pass_through_and_warmup_override(tmp_path):
    import dataclasses

    p = prof.load_session_preset("nsys")
    p = dataclasses.replace(p, flags={**p.flags, "delay": 2, "duration": 7.5})
    cmd = prof.build_command("nsys", p, STREAM_ARGS, warmup_runs=0)
    assert _flag(cmd, "--delay") == "2" and _flag(cmd, "--duration") == "7.5"
    assert "--warmup-runs" not in cmd and cmd[-len(STREAM_ARGS):] == STREAM_ARGS


def test_ncu_command_from_preset(tmp_path):
    cmd = prof.build_command("ncu", None, STREAM_ARGS, out_dir=tmp_path)
    assert cmd[0].endswith("ncu") and "--nvtx" in cmd
    assert _flag(cmd, "--nvtx-include") == "regex:hallolive-rt@dit.step/"
    sections = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--section"]
    for s in ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats"):
        assert s in sections
    assert int(_flag(cmd, "--launch-count")) > 0
    assert _flag(cmd, "--graph-profiling") == "node"
    assert _flag(cmd, "--export") == str(tmp_path / "hallolive-rt-ncu-dit")
    assert "--kernel-name" not in cmd                       # the dit target takes every kernel
    assert "--force-overwrite" in cmd and cmd[cmd.index("--force-overwrite") + 1].startswith("--")  # a switch


def test_ncu_targets_filter_by_documented_ranges():
    preset = prof.load_session_preset("ncu")
    names = list(hn.RANGES)
    for name, t in preset.targets.items():
        assert t["nvtx_range"] in names
        cmd = prof.build_command("ncu", preset, STREAM_ARGS, target=name)
        expr = _flag(cmd, "--nvtx-include")
        domain, rng = expr.removeprefix("regex:").split("@")
        assert domain == hn.DOMAIN and rng.endswith("/")
        # the regex (slashes as '.') picks exactly the target's range among the documented ones
        assert [n for n in names if re.fullmatch(rng[:-1], n)] == [t["nvtx_range"]]
        if "kernel_regex" in t:
            assert _flag(cmd, "--kernel-name") == f"regex:{t['kernel_regex']}"
    gemm = prof.build_command("ncu", preset, STREAM_ARGS, target="gemm")
    assert "gemm" in _flag(gemm, "--kernel-name")
    with pytest.raises(prof.PresetError, match="unknown ncu target"):
        prof.build_command("ncu", preset, STREAM_ARGS, target="nope")


def test_malformed_preset_is_refused(tmp_path):
    bad = tmp_path / "nsys.toml"
    bad.write_text('[nsys]\noutput = "x"\nwarmup_runs = 0\nunknown_key = 1\n[nsys.flags]\ntrace = "cuda"\n')
    with pytest.raises(prof.PresetError, match="unknown_key"):
        prof.load_session_preset("nsys", bad)
    text = (prof.resources.files("hallolive_rt.profiles") / "nsys.toml").read_text()
    for i, (old, new) in enumerate([('"session@hallolive-rt"', '"sesion@hallolive-rt"'), ("[nsys]", "[stream]\n[nsys]")]):
        wrong = tmp_path / f"nsys{i}.toml"
        wrong.write_text(text.replace(old, new))
        with pytest.raises(prof.PresetError, match="not a documented range|one table"):
            prof.load_session_preset("nsys", wrong)
    ncu = (prof.resources.files("hallolive_rt.profiles") / "ncu.toml").read_text()
    wrong.write_text(ncu.replace('nvtx_range = "vae/audio"', 'nvtx_range = "vae/sound"'))
    with pytest.raises(prof.PresetError, match="vae/sound is not a documented range"):
        prof.load_session_preset("ncu", wrong)


@pytest.mark.parametrize("session", ["nsys", "ncu"])
def test_missing_profiler_explains_and_offers_torch(session, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(prof, "_TOOLS", {k: (*v[:2], [], v[3]) for k, v in prof._TOOLS.items()})
    assert prof.find_profiler(session) is None
    cmd = prof.build_command(session, None, STREAM_ARGS)
    assert cmd[0] == session                         # still buildable, to show or copy elsewhere
    msg = prof.missing_profiler_message(session, cmd)
    assert f"`{session}`" in msg and "not found" in msg
    assert ("Nsight Systems" if session == "nsys" else "Nsight Compute") in msg
    assert "developer.nvidia.com" in msg and "apt" in msg
    assert "hallolive-rt profile --session torch" in msg
    assert shlex.join(cmd) in msg


def test_torch_session_trace_has_every_range_and_table_has_one_row_per_stage(tmp_path):
    calls = []

    def run():
        calls.append(1)
        synthetic_stream(BLOCKS, STEPS)

    trace_path, table = prof.run_torch_session(run, tmp_path, warmup_runs=1)
    assert len(calls) == 2
    with open(trace_path) as fh:
        trace = json.load(fh)
    ours = [e for e in trace["traceEvents"] if e.get("cat") == "user_annotation" and e.get("name") in hn.RANGES]
    names = [e["name"] for e in ours]
    for name in hn.RANGES:
        assert name in names, f"{name} missing from the torch trace"
    assert names.count("dit/step") == BLOCKS * STEPS                 # warm-up run left no ranges
    steps = sorted((e["args"]["block"], e["args"]["step"], e["args"]["payload"])
                   for e in ours if e["name"] == "dit/step")
    assert steps == [(b, s, b * 1000 + s) for b in range(BLOCKS) for s in range(STEPS)]

    assert [r.name for r in table.rows] == list(hn.RANGES)
    rows = {r.name: r for r in table.rows}
    assert rows["dit/step"].count == BLOCKS * STEPS and rows["session"].count == 1
    assert table.session_ms == pytest.approx(rows["session"].total_ms) and table.session_ms > 0
    assert all(r.min_ms <= r.mean_ms <= r.max_ms and r.total_ms == pytest.approx(r.mean_ms * r.count)
               for r in table.rows)
    text = str(table)
    print("\n" + text)
    lines = text.splitlines()
    assert len(lines) == 2 + len(hn.RANGES) and lines[2].split()[:2] == ["text/encode", "1"]
    assert lines[3].split()[0] == "session" and lines[3].split()[-1] == "100.0"


def test_cli_profile_torch_session_on_the_tiny_stream(tmp_path):
    """`hallolive-rt profile --session torch` runs the real tiny stream and writes a JSON trace that holds
    every documented range (decode ranges included, whichever thread ran them)."""
    import subprocess
    import sys

    out = tmp_path / "prof"
    cmd = [sys.executable, "-m", "hallolive_rt.cli", "profile", "--session", "torch", "--out-dir", str(out),
           "--warmup-runs", "0", "--preset", "tiny", "--blocks", "2", "--out", str(tmp_path / "p.mp4"),
           "--kv-impl", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = list(out.glob("*.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    names = [e.get("name") for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    for name in hn.RANGES:
        assert name in names, f"{name} missing from the trace of the real stream"
    assert names.count("dit/step") == 2 * 4 and names.count("block") == 2
    assert "dit/step" in proc.stdout and "perfetto" in proc.stdout
