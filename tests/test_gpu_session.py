"""`bash bench/gpu_session.sh --dry-run`: the GPU session's phases on the tiny preset on CPU, with `av` and
`nvtx` unimportable as on the GPU image; every JSON written with its keys, within the device tool's file
limits, the table printed last; a phase that times out and one that raises are recorded as such and the
next phase still runs."""

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
from gpu_variants import ENTRIES, entries  # noqa: E402

PHASE_KEYS = {"name", "kind", "status", "box_s", "elapsed_s", "wall_s", "exit_code", "options", "dry_run"}
# what each kind's JSON must hold (the schema the GPU session commits)
KIND_KEYS = {
    "check": {"command", "complete", "preset", "blocks", "dtype", "seed", "reference", "runs", "per_block", "summary",
              "bound", "env", "git_commit", "dit_options"},
    "e2e": {"command", "complete", "mode", "preset", "blocks", "dtype", "results", "projected", "flops_per_block",
            "flops", "env", "git_commit", "shapes", "dit_options", "nvtx", "weights_bytes"},
    "stages": {"build_s"},  # + one key per mode the entry runs (_kind_keys)
    "pytest": {"args", "kv_ext_build", "counts", "tests", "exit_code"},
    "script": {"argv", "exit_code", "env"},
}


def _kind_keys(e) -> set:
    """What an entry's JSON must hold: its kind's keys, the modes a stages entry runs."""
    if e.kind == "stages":
        return KIND_KEYS["stages"] | set(e.options.get("modes", ["dit", "vae"]))
    return KIND_KEYS[e.kind]
RESULT_KEYS = {"ttff_s", "steady_fps", "dit_only_fps_equiv", "vae_only_fps_equiv", "stage_ms_median", "stage_tflops",
               "inter_block_gap_s", "per_block", "session", "projected_two_device_fps"}


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 = this interpreter
    for var in ("OUT", "HALLOLIVE_SESSION_T0"):
        env.pop(var, None)
    return env


def _check_files(out: Path) -> list[Path]:
    """The device tool's limits: at most 8 files, 16 MiB each, plain names, no deeper than $OUT/a/b/file."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, [p.name for p in files]
    for p in files:
        assert p.stat().st_size < 16 * 2**20 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name)
        assert len(p.relative_to(out).parts) <= 3
    return files


def test_dry_run_writes_every_json_and_prints_the_table_last(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_session.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env={**_env(), "HALLOLIVE_SESSION_WORK": str(tmp_path / "work")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in _check_files(out)}
    default = entries()
    own = [e for e in default if e.own_file]
    assert files == {f"cpu-dryrun-{e.name}.json" for e in own} | {"cpu-dryrun-variants.json",
                                                                  "cpu-dryrun-session.json", "cpu-dryrun-session.log"}
    session = json.loads((out / "cpu-dryrun-session.json").read_text())
    assert session["setup"]["install"] == "check" and session["preset"] == "tiny"
    assert [p["name"] for p in session["phases"]] == [e.name for e in default]
    bad = {p["name"]: (p["status"], p.get("error")) for p in session["phases"] if p["status"] != "ok"}
    assert not bad, bad
    variants = json.loads((out / "cpu-dryrun-variants.json").read_text())
    for e in default:
        rec = json.loads((out / f"cpu-dryrun-{e.name}.json").read_text()) if e.own_file else variants[e.name]
        assert PHASE_KEYS <= set(rec["phase"]) and rec["phase"]["status"] == "ok", e.name
        assert _kind_keys(e) <= set(rec), (e.name, _kind_keys(e) - set(rec))
        for mode_out in ([rec] if e.kind == "e2e" else [rec[m] for m in ("dit", "vae") if m in rec]
                         if e.kind == "stages" else []):
            assert mode_out["complete"] is True and KIND_KEYS["e2e"] <= set(mode_out)
            for r in mode_out["results"].values():
                assert RESULT_KEYS <= set(r) and len(r["per_block"]) == 2
    a = json.loads((out / "cpu-dryrun-a-correctness.json").read_text())
    floor = a["summary"]["eager (repeat)_vs_eager"]
    assert floor["bitwise_equal"] is True and floor["within_bound"] is True and len(a["per_block"]) == 2
    b = json.loads((out / "cpu-dryrun-b-e2e.json").read_text())
    assert b["results"]["eager"]["steady_fps"] > 0 and b["nvtx"]["backend"] == "none", "nvtx made unimportable"
    c = json.loads((out / "cpu-dryrun-c-stages.json").read_text())
    assert c["projected"]["two_device_fps"] > 0 and "projected" in c["projected"]["label"]
    d = json.loads((out / "cpu-dryrun-d-cuda-tests.json").read_text())
    assert d["exit_code"] == 0 and d["counts"]["skipped"] > 0 and d["kv_ext_build"]["ok"], "collects without av"
    assert variants["c-stages-kv-ext"]["dit"]["dit_options"]["kv_impl"] == "ext"
    # the last lines printed are the table: a header and one line per entry
    tail = proc.stdout.strip().splitlines()[-(len(default) + 1):]
    assert tail[0].split()[:3] == ["entry", "status", "time"]
    assert [ln.split()[:2] for ln in tail[1:]] == [[e.name, "ok"] for e in default]


def test_a_timeout_and_an_error_are_recorded_and_the_next_phase_still_runs(tmp_path, monkeypatch, capsys):
    """a-correctness gets a 3 s box and 60 blocks to check (killed: "timeout"; with its 2 dry-run blocks it
    could finish inside 3 s on a warm machine); b-e2e is given an attention kernel a CPU cannot run
    (it raises: "error", with the message and traceback); d-kv-write-bench still runs and passes. The
    package comes from the symlink folder (--install farm), the fallback for a machine where pip cannot."""
    monkeypatch.setenv("HALLOLIVE_SESSION_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    out = tmp_path / "out"
    session = gpu_driver.run_session(out, dry_run=True, only=["a-correctness", "b-e2e", "d-kv-write-bench"],
                                     boxes={"a-correctness": 3},
                                     overrides={"a-correctness": {"blocks": 60}, "b-e2e": {"attn_kernel": "efficient"}},
                                     install="farm")
    assert session["setup"]["install"] == "farm"
    status = {p["name"]: p for p in session["phases"]}
    assert status["a-correctness"]["status"] == "timeout" and "3 s box" in status["a-correctness"]["error"]
    assert status["b-e2e"]["status"] == "error" and "efficient" in status["b-e2e"]["error"]
    assert status["d-kv-write-bench"]["status"] == "ok"
    b = json.loads((out / "cpu-dryrun-b-e2e.json").read_text())
    assert b["phase"]["status"] == "error" and "Traceback" in b["phase"]["traceback_tail"]
    assert b["phase"]["options"]["attn_kernel"] == "efficient"
    a = json.loads((out / "cpu-dryrun-a-correctness.json").read_text())
    assert a["phase"]["status"] == "timeout"
    printed = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[:2] for ln in printed[-3:]] == [["a-correctness", "timeout"], ["b-e2e", "error"],
                                                      ["d-kv-write-bench", "ok"]]
    _check_files(out)


def test_registry_is_well_formed_and_the_baseline_fits_the_budget():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names))
    base = [e for e in entries() if e.own_file and e.kind in ("check", "e2e", "stages")]
    assert [e.name for e in base] == ["a-correctness", "b-e2e", "c-stages"]
    assert gpu_driver.SETUP_BOX_S + sum(e.box_s for e in base) <= gpu_driver.BUDGET_S <= 540
    assert all(e.name != "aoti-dit" for e in entries()), "the AOTI package never runs by default"
    assert len([e for e in entries() if e.own_file]) + 3 <= 8, "the device tool brings back 8 files"
    assert gpu_driver.card_slug("NVIDIA H100 80GB HBM3") == "h100" and gpu_driver.card_slug("NVIDIA H200") == "h200"
    with pytest.raises(ValueError, match="unknown entries"):
        entries(["nope"])
