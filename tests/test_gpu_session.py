"""`bash bench/gpu_session.sh --dry-run`: every entry of the GPU session on the tiny preset on CPU, with `av`
and `nvtx` unimportable; every JSON written with its kind's keys (the viewer's verdict per video decoder with
its memory record, the ncu entries skipped with their program run, the pytest deadline), within the
session's file limits, the viewer's table and the table of entries printed last; a phase that times out and
one that raises are recorded as such and the next still runs; the viewer's rule, the out-of-memory rerun and
the ncu report summary on synthetic inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_driver  # noqa: E402
import gpu_ncu  # noqa: E402
import gpu_viewer  # noqa: E402
from gpu_variants import (  # noqa: E402
    DRY_VIEWER_BLOCKS,
    ENTRIES,
    KIND_OPTIONS,
    VIEWER_BLOCKS,
    entries,
    output_files,
)

PHASE_KEYS = {"name", "kind", "status", "box_s", "elapsed_s", "wall_s", "exit_code", "options", "dry_run"}
# what each kind's JSON must hold (the schema the GPU session commits)
KIND_KEYS = {
    "check": {"command", "complete", "preset", "blocks", "dtype", "seed", "reference", "runs", "per_block", "summary",
              "bound", "env", "git_commit", "dit_options", "kv_ext"},
    "e2e": {"command", "complete", "mode", "preset", "blocks", "dtype", "results", "projected", "flops_per_block",
            "flops", "env", "git_commit", "shapes", "dit_options", "kv_ext", "nvtx", "weights_bytes", "video_decoder"},
    "stages": {"build_s"},  # + one key per mode the entry runs (_kind_keys)
    "pytest": {"args", "kv_ext_build", "counts", "tests", "exit_code"},
    "script": {"argv", "exit_code", "env"},
    "ncu": {"target", "nvtx_range", "nvtx_include", "nvtx_client", "launch_count", "command", "program", "exit_code",
            "target_run", "range_entered", "output_tail"},
}
RESULT_KEYS = {"ttff_s", "steady_fps", "dit_only_fps_equiv", "vae_only_fps_equiv", "stage_ms_median", "stage_tflops",
               "inter_block_gap_s", "per_block", "session", "projected_two_device_fps"}
VERDICT_KEYS = {"blocks", "policy", "video_decoder", "dit_backend", "ttff_s", "steady_fps", "target_fps", "gap_s",
                "block_playback_s", "real_time", "checks", "peak_gpu_allocated_gib"}
CAP_KEYS = {"cap_gib", "applied", "fraction", "device_total_gib", "fits", "error", "peak_allocated_gib",
            "peak_reserved_gib", "host_peak_rss_gib", "uncapped_rerun", "how"}


def _kind_keys(e) -> set:
    if e.kind == "stages":
        return KIND_KEYS["stages"] | set(e.options.get("modes", ["dit", "vae"]))
    return KIND_KEYS[e.kind] | ({"viewer"} if "memory_cap_gib" in e.options else set())


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 = this interpreter
    for var in ("OUT", "HALLOLIVE_SESSION_T0"):
        env.pop(var, None)
    return env


def _check_files(out: Path) -> list[Path]:
    """The script's output contract: at most 8 files, each under 16 MiB, plain names, at most $OUT/a/b/file."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, [p.name for p in files]
    for p in files:
        assert p.stat().st_size < 16 * 2**20 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert len(p.relative_to(out).parts) <= 3
    return files


def _check_viewer(name: str, rec: dict, entry) -> None:
    v = rec["viewer"]
    assert "p99" in v["rule"] and "steady_fps" in v["rule"] and "block_playback_s" in v["rule"]
    assert rec["video_decoder"] == entry.options["video_decoder"], name
    (run,) = v["runs"].values()
    assert VERDICT_KEYS <= set(run) and run["video_decoder"] == entry.options["video_decoder"]
    assert run["policy"] == "rolling" and run["blocks"] == DRY_VIEWER_BLOCKS
    assert run["gap_s"]["count"] == DRY_VIEWER_BLOCKS - 1
    rule = run["gap_s"]["p99"] <= run["block_playback_s"] and run["steady_fps"] >= run["target_fps"]
    assert isinstance(run["real_time"], bool) and run["real_time"] == rule
    assert run["checks"]["gap_p99_within_playback"] == (run["gap_s"]["p99"] <= run["block_playback_s"])
    assert run["gap_s"]["p50"] <= run["gap_s"]["p99"] <= run["gap_s"]["max"]
    cap = v["memory_cap"]
    assert CAP_KEYS <= set(cap) and cap["cap_gib"] == entry.options["memory_cap_gib"]
    assert cap["applied"] is False and cap["fraction"] is None and cap["fits"] is None and "cpu" in cap["reason"]
    assert cap["host_peak_rss_gib"] > 0


def test_dry_run_writes_every_json_and_prints_the_tables_last(tmp_path):
    from hallolive_rt.runtime.profiling import find_profiler

    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env={**_env(), "HALLOLIVE_SESSION_WORK": str(tmp_path / "work")},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in _check_files(out)}
    default = entries()
    expected = output_files(default, "cpu-dryrun")
    ncu_here = find_profiler("ncu") is not None
    assert files == expected - (set() if ncu_here else {"cpu-dryrun-ncu-reports.zip"}), files ^ expected
    session = json.loads((out / "cpu-dryrun-session.json").read_text())
    assert session["setup"]["install"] == "check" and session["preset"] == "tiny"
    assert [p["name"] for p in session["phases"]] == [e.name for e in default]
    want = {e.name: "ok" if e.kind != "ncu" or ncu_here else "skipped" for e in default}
    got = {p["name"]: p["status"] for p in session["phases"]}
    assert got == want, {p["name"]: (p["status"], p.get("error")) for p in session["phases"]
                         if got[p["name"]] != want[p["name"]]}
    shared = {e.file: json.loads((out / f"cpu-dryrun-{e.file}.json").read_text()) for e in default}
    for e in default:
        rec = shared[e.file] if e.own_file else shared[e.file][e.name]
        assert PHASE_KEYS <= set(rec["phase"]) and rec["phase"]["status"] == want[e.name], e.name
        assert _kind_keys(e) <= set(rec), (e.name, _kind_keys(e) - set(rec))
        for mode_out in ([rec] if e.kind == "e2e" else [rec[m] for m in ("dit", "vae") if m in rec]
                         if e.kind == "stages" else []):
            assert mode_out["complete"] is True and KIND_KEYS["e2e"] <= set(mode_out)
            for r in mode_out["results"].values():
                assert RESULT_KEYS <= set(r) and len(r["per_block"]) == (mode_out["blocks"])
        if "memory_cap_gib" in e.options:
            _check_viewer(e.name, rec, e)
        if e.kind == "ncu":
            target = e.options["target"]
            assert rec["nvtx_range"] in ("vae/video", "dit/step")
            assert f"--nvtx-include {rec['nvtx_include']}" in rec["command"]
            assert f"--launch-count {e.options['launch_count']}" in rec["command"] and "ncu_target.py" in rec["command"]
            assert rec["exit_code"] == 0 and rec["range_entered"] >= 2, (target, rec["target_run"])
            assert ncu_here or "ncu" in rec["phase"]["error"]
    viewer = shared["e-viewer"]
    assert {n for n in viewer} == {e.name for e in default if e.file == "e-viewer"} >= {"e-viewer-full",
                                                                                        "e-viewer-taew2_2"}
    a = shared["a-correctness"]
    floor = a["summary"]["eager (repeat)_vs_eager"]
    assert floor["bitwise_equal"] is True and floor["within_bound"] is True and len(a["per_block"]) == 2
    variants = shared["variants"]
    b = variants["b-e2e"]
    assert b["results"]["eager"]["steady_fps"] > 0 and b["nvtx"]["backend"] == "none", "nvtx made unimportable"
    assert variants["v-e2e-auto"]["backend_choice"]["picked"] == "eager" and "cpu" in variants["v-e2e-auto"][
        "backend_choice"]["reason"]
    c = variants["c-stages"]
    assert c["projected"]["two_device_fps"] > 0 and "projected" in c["projected"]["label"]
    d = shared["d-cuda-tests"]
    assert d["exit_code"] == 0 and d["counts"]["skipped"] > 0 and d["kv_ext_build"]["ok"], "collects without av"
    assert d["deadline_s"] == 140 and d["counts"]["not_run"] == 0
    assert variants["c-stages-kv-ext"]["dit"]["dit_options"]["kv_impl"] == "ext"
    # printed last: the viewer's table (a line per decoder), a blank line, the session line, the entry table
    lines = proc.stdout.strip().splitlines()
    tail = lines[-(len(default) + 1):]
    assert tail[0].split()[:3] == ["entry", "status", "time"]
    assert [ln.split()[:2] for ln in tail[1:]] == [[e.name, want[e.name]] for e in default]
    assert lines[-len(default) - 2].startswith("GPU session (cpu-dryrun")
    table = session["viewer_table"]
    assert table[1].split()[:2] == ["run", "DiT"] and len(table) == 2 + len(viewer)
    assert [row.split()[0] for row in table[2:]] == [n.removeprefix("e-viewer-") for n in viewer]
    assert "\n".join(table) in proc.stdout
    again = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_table.py"), str(out)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "\n".join(table) in again.stdout and "e-viewer-full" in again.stdout


def test_a_timeout_an_error_and_the_pytest_deadline_are_recorded(tmp_path, monkeypatch, capsys):
    """a-correctness gets a 3 s box and 60 blocks to check (killed: "timeout"); b-e2e is given an attention
    kernel a CPU cannot run (it raises: "error", with the message and traceback); d-cuda-tests gets a
    deadline already past (its one test is skipped as "not run", the entry ends "ok"); d-kv-write-bench
    still runs and passes. The package comes from the symlink folder (--install farm), the fallback for a
    machine where pip cannot."""
    monkeypatch.setenv("HALLOLIVE_SESSION_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    only = ["a-correctness", "d-cuda-tests", "b-e2e", "d-kv-write-bench"]
    session = gpu_driver.run_session(
        out, dry_run=True, only=only, boxes={"a-correctness": 3}, install="farm",
        overrides={"a-correctness": {"blocks": 60}, "b-e2e": {"attn_kernel": "efficient"},
                   "d-cuda-tests": {"deadline_s": 0.001, "prebuild_kv_ext": False,
                                    "args": ["tests/test_gpu_session.py", "-k", "registry"]}})
    assert session["setup"]["install"] == "farm"
    status = {p["name"]: p for p in session["phases"]}
    assert status["a-correctness"]["status"] == "timeout" and "3 s box" in status["a-correctness"]["error"]
    assert status["b-e2e"]["status"] == "error" and "efficient" in status["b-e2e"]["error"]
    assert status["d-kv-write-bench"]["status"] == "ok" and status["d-cuda-tests"]["status"] == "ok"
    b = json.loads((out / "cpu-dryrun-variants.json").read_text())["b-e2e"]
    assert b["phase"]["status"] == "error" and "Traceback" in b["phase"]["traceback_tail"]
    assert b["phase"]["options"]["attn_kernel"] == "efficient"
    a = json.loads((out / "cpu-dryrun-a-correctness.json").read_text())
    assert a["phase"]["status"] == "timeout"
    d = json.loads((out / "cpu-dryrun-d-cuda-tests.json").read_text())
    assert d["counts"]["not_run"] == 1 and d["counts"]["passed"] == 0, d["counts"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[:2] for ln in printed[-4:]] == [["a-correctness", "timeout"], ["d-cuda-tests", "ok"],
                                                      ["b-e2e", "error"], ["d-kv-write-bench", "ok"]]
    _check_files(out)


def test_registry_order_boxes_and_files():
    from hallolive_rt.options import FLAT_KEYS
    from hallolive_rt.profile import load_profile

    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names))
    for e in ENTRIES:  # every option is a run option or its kind's own (a typo would be silently ignored)
        unknown = (set(e.options) | set(e.dry)) - set(KIND_OPTIONS[e.kind]) - FLAT_KEYS
        assert not unknown, (e.name, unknown)
    default = entries()
    assert [e.name for e in default[:4]] == ["a-correctness", "e-viewer-full", "e-viewer-taew2_2", "d-cuda-tests"]
    # correctness and both viewer runs always start: setup and their boxes fit the budget, which (with a last
    # entry's 20 s kill) fits a 10-minute command
    assert gpu_driver.SETUP_BOX_S + sum(e.box_s for e in default[:3]) <= gpu_driver.BUDGET_S <= 575
    assert all(e.name != "aoti-dit" for e in default), "the AOTI package never runs by default"
    assert len(output_files(default, "h100")) <= 8 and len(output_files(ENTRIES, "h100")) <= 8
    viewers = {e.options["video_decoder"]: e for e in default if e.file == "e-viewer" and "precision" not in e.options}
    assert set(viewers) == {"full", "taew2_2"}
    assert viewers["full"].options["memory_cap_gib"] == 32 and viewers["taew2_2"].options["memory_cap_gib"] == 24
    assert VIEWER_BLOCKS >= 15 and VIEWER_BLOCKS > load_profile("hallolive-512x992").stream.blocks
    assert DRY_VIEWER_BLOCKS > load_profile("tiny").stream.blocks
    tests = next(e for e in default if e.kind == "pytest")
    assert tests.options["deadline_s"] <= 150 and tests.box_s <= 170
    assert {e.options["target"] for e in default if e.kind == "ncu"} == {"vae", "dit"}
    assert gpu_driver.card_slug("NVIDIA H100 80GB HBM3") == "h100" and gpu_driver.card_slug("NVIDIA H200") == "h200"
    with pytest.raises(ValueError, match="unknown entries"):
        entries(["nope"])


def _result(gaps, steady_fps, fps=25.0, frames=24):
    return {"inter_block_gap_s": {"values": gaps, "block_playback_s": frames / fps}, "fps_written": fps,
            "steady_fps": steady_fps, "ttff_s": 0.5, "blocks": len(gaps) + 1,
            "session": {"policy": "rolling", "video_decoder": "full", "backend": "compiled", "vae": {"label": "eager"}},
            "peak_memory_gib": {"cuda:0": 30.0}}


def test_real_time_rule_at_its_edges():
    assert gpu_viewer.verdict(_result([0.96] * 14, 25.0))["real_time"] is True  # equal is real time
    v = gpu_viewer.verdict(_result([0.9] * 13 + [1.2], 26.0))
    assert v["real_time"] is False and v["checks"] == {"gap_p99_within_playback": False,
                                                        "steady_fps_at_least_target": True}
    assert v["gap_s"]["p50"] == pytest.approx(0.9) and v["gap_s"]["max"] == 1.2
    assert gpu_viewer.verdict(_result([0.5] * 14, 24.9))["real_time"] is False
    assert gpu_viewer.verdict(_result([], None))["real_time"] is None  # one block: no verdict
    assert gpu_viewer.verdict(_result([0.9], 25.0))["peak_gpu_allocated_gib"] == 30.0


def test_a_run_over_its_cap_is_recorded_and_measured_again_uncapped(monkeypatch):
    """An out-of-memory error under the cap: fits false with the error, the cap lifted, the same run again
    (its figures and peaks recorded), the entry "failed" with what it needs."""
    import gpu_phase
    import torch
    from hallolive_rt.runtime import bench

    class Cap(gpu_viewer.MemoryCap):
        def __init__(self, cap_gib, device):
            super().__init__(cap_gib, device)
            self.applied, self.lifted = True, False

        def lift(self):
            self.lifted, self.rerun = True, {"peak_allocated_gib": 33.0, "peak_reserved_gib": 34.5}

    calls, emitted = [], []

    def fake_bench(*args, on_update, **kw):
        calls.append(kw["blocks"])
        if len(calls) == 1:
            on_update({"results": {}})
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = {"results": {"compiled": _result([0.9] * 14, 26.0)}}
        on_update(out)
        return out

    monkeypatch.setattr(gpu_viewer, "MemoryCap", Cap)
    monkeypatch.setattr(bench, "bench_main", fake_bench)
    o = {"backends": ["compiled"], "blocks": 15, "memory_cap_gib": 32, "video_decoder": "full", "preset": "tiny",
         "device": "cpu"}
    with pytest.raises(gpu_phase.Failed, match="does not fit under the 32 GiB cap.*34.5 GiB"):
        gpu_phase.run_e2e(o, emitted.append)
    assert calls == [15, 15]
    cap = emitted[-1]["viewer"]["memory_cap"]
    assert cap["fits"] is False and "out of memory" in cap["error"]
    assert cap["uncapped_rerun"]["peak_reserved_gib"] == 34.5
    assert emitted[-1]["viewer"]["runs"]["compiled"]["real_time"] is True


def test_ncu_summary_from_its_csv_and_the_filter_per_nvtx_client():
    sm = "Compute (SM) Throughput"
    rows = [("1", "gemm_kernel", "Duration", "usecond", "1,000.5"), ("1", "gemm_kernel", sm, "%", "80"),
            ("2", "gemm_kernel", "Duration", "msecond", "2"), ("2", "gemm_kernel", sm, "%", "50"),
            ("3", "norm", "Duration", "nsecond", "500"), ("3", "norm", "Memory Throughput", "%", "90"),
            ("3", "norm", "Block Limit Registers", "block", "8")]
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    text = "==WARNING== a line before the header\n" + header + "\n" + "\n".join(
        ",".join(f'"{c}"' for c in r) for r in rows)
    s = gpu_ncu.summarize_csv(text)
    assert s["kernels_profiled"] == 3 and s["distinct_kernels"] == 2
    top = s["top"][0]
    assert top["name"] == "gemm_kernel" and top["count"] == 2 and top["total_us"] == pytest.approx(3000.5)
    assert top["sm_pct_weighted"] == pytest.approx((80 * 1000.5 + 50 * 2000) / 3000.5)
    assert s["top"][1]["mem_pct_weighted"] == pytest.approx(90)
    assert gpu_ncu.nvtx_filter("vae/video", "nvtx") == "regex:hallolive-rt@vae.video/"
    assert gpu_ncu.nvtx_filter("vae/video", "torch.cuda.nvtx") == "regex:vae.video/"
    head = gpu_ncu._with_flags(["ncu", "--nvtx-include", "regex:x/", "--launch-count", "200"],
                               {"nvtx-include": "regex:y/", "launch-count": 30, "export": "r"})
    assert head == ["ncu", "--nvtx-include", "regex:y/", "--launch-count", "30", "--export", "r"]
