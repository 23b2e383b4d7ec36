"""One entry of the GPU session (bench/gpu_variants.py), in its own process; run by bench/gpu_driver.py.

    python bench/gpu_phase.py --entry b-e2e --store OUT/h100-b-e2e.json --preset hallolive-512x992 --device cuda

Writes the entry's JSON through the store as results come in (every block, for the bench kinds), with a
``phase`` record on top: status "running" until the entry ends, then "ok", "failed" (it ran, its checks
did not pass: pytest failures, a script's non-zero exit) or "error" (an exception: message and traceback
tail recorded, exit code 1). A timeout or a crash is recorded by the driver, which reads the same file.

HALLOLIVE_SIMULATE_MISSING=av,nvtx (set by the dry run) makes those imports fail here, as they do on the
GPU image, before anything else is imported.
"""

from __future__ import annotations

import os
import sys

for _mod in filter(None, os.environ.get("HALLOLIVE_SIMULATE_MISSING", "").split(",")):
    sys.modules[_mod.strip()] = None  # `import av` now raises ImportError, as on a machine without it

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from gpu_driver import REPO, Store  # noqa: E402  (bench/ is this script's folder: first on sys.path)
from gpu_variants import ENTRIES  # noqa: E402


class Failed(Exception):
    """The entry ran to its end but what it checks did not pass (recorded as status "failed")."""


# ---- the kinds ------------------------------------------------------------------------------------------------

BENCH_OPTIONS = ("kv_impl", "fuse_projections", "attn_kernel", "seed", "warmup_runs", "overlap",
                 "vae_backend", "vae_channels_last", "compare_overlap")  # bench_main keyword arguments
CHECK_OPTIONS = ("kv_impl", "fuse_projections", "attn_kernel", "seed")      # check_backends': the DiT only


LEVER_OPTIONS = ("precision", "fp8_act_scale", "lean_context")  # -> levers=DiTLevers(...) (runtime/levers.py)


def _bench_kwargs(o: dict, names=BENCH_OPTIONS) -> dict:
    kw = {k: o[k] for k in names if k in o}
    levers = {k: o[k] for k in LEVER_OPTIONS if k in o}
    if levers:
        from hallolive_rt.runtime.levers import DiTLevers

        kw["levers"] = DiTLevers(**levers)
    return kw


def run_check(o: dict, emit) -> None:
    from hallolive_rt.runtime.bench_check import check_backends

    kw = _bench_kwargs(o, CHECK_OPTIONS)
    check_backends(o["preset"], o["backends"], o.get("blocks", 3), device=o["device"], on_update=emit, **kw)


def run_e2e(o: dict, emit) -> None:
    from hallolive_rt.runtime.bench import bench_main

    bench_main(o["preset"], True, o["backends"], o.get("blocks"), "e2e", device=o["device"], on_update=emit,
               **_bench_kwargs(o))


def run_stages(o: dict, emit) -> None:
    """DiT-only and/or VAE-only on ONE set of components, and the projected two-device rate."""
    from hallolive_rt.kvcache.build import require_kv_ext
    from hallolive_rt.profile import load_profile
    from hallolive_rt.runtime.bench import bench_main, combine_projection
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.placement import resolve_devices

    kw = _bench_kwargs(o)
    dit_dev, vae_dev = resolve_devices(o["device"])
    require_kv_ext(kw.get("kv_impl", "torch"), dit_dev)  # before the weights, like bench_main
    prof = load_profile(o["preset"])  # released geometry: the block count goes to bench_main
    t = time.perf_counter()
    comps = load_components(prof, None, dit_device=dit_dev, vae_device=vae_dev, dtype=prof.dtype,
                            seed=kw.get("seed", 0), with_text=False)
    res: dict = {"build_s": time.perf_counter() - t}
    for mode in o.get("modes", ["dit", "vae"]):
        res[mode] = bench_main(o["preset"], True, o["backends"], o.get("blocks"), mode, device=o["device"],
                               components=comps, on_update=lambda out, m=mode: emit({**res, m: out}), **kw)
    if "dit" in res and "vae" in res:
        res["projected"] = combine_projection(res["dit"], res["vae"])
    emit(res)


class _Recorder:
    """pytest plugin: every test's outcome (and a failure's message) into the entry's JSON the moment the
    test ends, so a run killed at its box still says what passed, what failed and why (the first H100
    session lost the failures of three tests that way: -v showed FAILED, the summary never came)."""

    def __init__(self, res: dict, emit):
        self.res, self.emit = res, emit
        res["tests"], res["counts"] = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        res["running"] = None

    def pytest_runtest_logstart(self, nodeid, location):
        self.res["running"] = nodeid

    def pytest_runtest_logreport(self, report):
        # one record per test: its call (or the setup that failed or skipped it, or a teardown error)
        if report.when == "call" or report.outcome != "passed":
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            msg = report.longreprtext[-2000:] if report.outcome != "passed" else ""
            self.res["counts"][outcome] += 1
            self.res["tests"].append({"name": report.nodeid, "outcome": outcome, "when": report.when,
                                      "time_s": round(report.duration, 2), "message": msg})
            self.emit(self.res)


def run_pytest(o: dict, emit) -> None:
    import pytest

    res: dict = {"args": o["args"]}
    if o.get("prebuild_kv_ext"):  # the extension's build, timed and recorded apart from the tests
        from hallolive_rt.kvcache.build import require_kv_ext

        t = time.perf_counter()
        try:
            res["kv_ext_build"] = {"ok": True, **require_kv_ext("ext", o["device"])}
        except Exception as e:  # noqa: BLE001 - recorded; the tests then show what depends on it
            res["kv_ext_build"] = {"ok": False, "error": str(e)}
        res["kv_ext_build"]["s"] = time.perf_counter() - t
        emit(res)
    # -v: the log shows which test was running if the box kills the run; a hung test fails alone where
    # pytest-timeout is installed (the GPU image has it); --tb=short: each failure's cause stays readable
    args = [*o["args"], "-v", "--tb=short", "-rfEs", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["-o", f"timeout={o.get('test_timeout_s', 90)}"]
    workers = o.get("workers", 0) if o["device"] != "cpu" else 0
    if workers and importlib.util.find_spec("xdist") is not None:
        # the tests are tiny models: several share the GPU well, and inductor's compiles run in parallel
        # on the CPU cores; one file per worker keeps module fixtures built once
        args += ["-n", str(workers), "--dist", "loadfile"]
        res["workers"] = workers
    if os.environ.get("HALLOLIVE_PYTEST_APPEND"):  # the package comes from PYTHONPATH (no install)
        args.append("--import-mode=append")
    rec = _Recorder(res, emit)
    rc = int(pytest.main(args, plugins=[rec]))
    res.update(exit_code=rc, running=None)
    emit(res)
    if rc not in (0, 5):  # 5: nothing collected
        raise Failed(f"pytest exit code {rc}: {res['counts']}")


def run_script(o: dict, emit) -> None:
    """A bench script run in this process (so the simulated-missing imports hold for it too)."""
    import hallolive_rt.runtime.metrics  # noqa: F401  (pins the installed package before the script's path hack)

    script = REPO / o["script"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ("out.json" if o.get("out") == "file" else "out")
        argv = [str(script), *o["args"], "--out", str(out)]
        if o.get("preset_arg"):  # the script takes the session's preset
            argv += ["--preset", o["preset"]]
        sys.argv = argv
        rc = 0
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        files = [out] if out.is_file() else sorted(out.glob("*.json")) if out.is_dir() else []
        res = {"argv": argv[1:], "exit_code": rc, **(json.loads(files[0].read_text()) if files else {})}
    emit(res)
    if rc != 0 or not files:
        raise Failed(f"{o['script']} exit code {rc}, {'no JSON written' if not files else 'JSON written'}")


KIND_RUNNERS = {"check": run_check, "e2e": run_e2e, "stages": run_stages, "pytest": run_pytest,
                "script": run_script}


# ---- entry point ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entry", required=True)
    ap.add_argument("--store", type=Path, required=True, help="JSON file the results go to")
    ap.add_argument("--key", default=None, help="store under this key of the file (variants)")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--box-s", type=float, default=None)
    ap.add_argument("--set-json", default="{}", help="options merged over the entry's (JSON object)")
    a = ap.parse_args(argv)
    entry = {e.name: e for e in ENTRIES}.get(a.entry)
    if entry is None:
        ap.error(f"unknown entry {a.entry!r}")
    opts = {**entry.resolved(a.dry_run), **json.loads(a.set_json), "preset": a.preset, "device": a.device}
    store = Store(a.store, a.key)
    meta = {"name": entry.name, "kind": entry.kind, "status": "running", "box_s": a.box_s, "dry_run": a.dry_run,
            "options": opts, "note": entry.note, "started_unix": time.time()}
    t0 = time.perf_counter()

    def emit(result: dict) -> None:
        store.write({"phase": {**meta, "elapsed_s": time.perf_counter() - t0}, **result})

    emit({})
    status, code = "ok", 0
    try:
        KIND_RUNNERS[entry.kind](opts, emit)
    except Failed as e:
        status, code, meta["error"] = "failed", 1, str(e)
    except BaseException as e:  # noqa: BLE001 - recorded for the session, then re-signalled by the exit code
        status, code = "error", 1
        meta["error"] = f"{type(e).__name__}: {e}"[-4000:]
        meta["traceback_tail"] = traceback.format_exc()[-4000:]
        traceback.print_exc()
    store.update_phase(status=status, elapsed_s=time.perf_counter() - t0, error=meta.get("error"),
                       traceback_tail=meta.get("traceback_tail"))
    return code


if __name__ == "__main__":
    sys.exit(main())
