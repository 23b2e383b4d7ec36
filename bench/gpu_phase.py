"""One entry of the GPU session (bench/gpu_variants.py) in its own process, run by bench/gpu_driver.py
(``python bench/gpu_phase.py --entry e-viewer-full --store OUT/h100-e-viewer.json --key e-viewer-full
--preset hallolive-512x992 --device cuda --card h100``): it writes the entry's JSON through the store as
results come in (every block, for the bench kinds), under a ``phase`` record whose status is "running"
until the entry ends, then "ok", "failed" (it ran and what it checks did not pass: pytest failures, a
script's non-zero exit, an out-of-memory error under a memory cap, a profile that caught no kernel),
"skipped" (what it needs is not on this machine: ncu) or "error" (an exception, with its message and
traceback tail; exit code 1); a timeout or a crash is recorded by the driver, which reads the same file.
``HALLOLIVE_SIMULATE_MISSING=av,nvtx`` (set by the dry run) makes those imports fail here, as on a machine
without those packages, before anything else is imported."""

from __future__ import annotations

import os
import sys

for _mod in filter(None, os.environ.get("HALLOLIVE_SIMULATE_MISSING", "").split(",")):
    sys.modules[_mod.strip()] = None  # `import av` now raises ImportError, as on a machine without it

import argparse  # noqa: E402
import functools  # noqa: E402
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


class Skipped(Exception):
    """What the entry needs is not on this machine (recorded as status "skipped", exit code 0)."""


# ---- the kinds ------------------------------------------------------------------------------------------------

RUN_OPTIONS = ("warmup_runs", "compare_overlap")  # bench_main's own; the rest are run options (from_flat)


def _options(o: dict):
    """An entry's options -> (ModelSource, DiTOptions, DecoderOptions): random weights of its preset."""
    from hallolive_rt.options import from_flat

    return from_flat({k: v for k, v in o.items() if k != "vae_backend"} | {"random_weights": True})


def _run_kwargs(o: dict) -> dict:
    """bench_main's own arguments of an entry: the decoder variants it lists (``vae_backend``: a comma list)."""
    from hallolive_rt.options import VideoDecodeOptions

    kw = {k: o[k] for k in RUN_OPTIONS if k in o}
    if "vae_backend" in o:
        kw["vae_variants"] = VideoDecodeOptions.parse_list(o["vae_backend"], o.get("vae_channels_last", False))
    return kw


def _backends(o: dict) -> list[str]:
    """The entry's DiT backends, ``auto`` replaced by what it resolves to on this machine (bench_main takes
    concrete names; its JSON records the pick and the reason under ``backend_choice``)."""
    if "auto" not in o["backends"]:
        return o["backends"]
    from hallolive_rt.runtime.resolve import resolve_run

    model, dit, decoders = _options({**o, "backend": "auto"})
    pick = resolve_run(model, dit, decoders, blocks=o.get("blocks"), text=False).dit.backend
    return list(dict.fromkeys(pick if n == "auto" else n for n in o["backends"]))


def run_check(o: dict, emit) -> None:
    from hallolive_rt.runtime.bench_check import check_backends

    model, dit, _ = _options(o)
    check_backends(model, dit, backends=o["backends"], blocks=o.get("blocks", 3), on_update=emit)


def run_e2e(o: dict, emit) -> None:
    """``bench_main(mode="e2e")``; with ``memory_cap_gib``, under that cap and with the viewer's verdict. A
    run that does not fit the cap is recorded so (``fits: false``, the error) and then run again without
    it, so the viewer still gets its figures and the memory the run needs; the entry is then "failed"."""
    from hallolive_rt.runtime.bench import bench_main

    def bench(on_update):
        return bench_main(*_options(o), backends=_backends(o), blocks=o.get("blocks"), mode="e2e",
                          on_update=on_update, **_run_kwargs(o))

    if o.get("memory_cap_gib") is None:
        bench(emit)
        return
    from gpu_viewer import MemoryCap, is_out_of_memory, viewer_summary

    cap = MemoryCap(o["memory_cap_gib"], o["device"])  # before the first CUDA allocation of this process
    state: dict = {}

    def update(out: dict) -> None:
        cap.watch()
        state["out"] = out
        emit({**out, "viewer": viewer_summary(out, cap)})

    oom = None
    try:
        out = bench(update)
    except BaseException as e:
        cap.done(e)
        update(state.get("out", {}))
        if not (cap.applied and is_out_of_memory(e)):
            raise
        oom = f"{type(e).__name__}: {str(e)[:600]}"
        e.__traceback__ = None  # its frames hold the model: let it go before the second run
    if oom is None:
        cap.done()
        update(out)
        return
    import gc

    import torch

    state.clear()
    gc.collect()
    torch.cuda.empty_cache()
    cap.lift()
    out = bench(update)
    cap.watch()
    update(out)
    need = (cap.rerun or {}).get("peak_reserved_gib")
    raise Failed(f"does not fit under the {o['memory_cap_gib']} GiB cap ({oom}); measured again without the cap: "
                 f"peak {'-' if need is None else f'{need:.1f}'} GiB reserved")


def run_stages(o: dict, emit) -> None:
    """DiT-only and/or VAE-only on ONE set of components, and the projected two-device rate."""
    from hallolive_rt.runtime.bench import bench_main, combine_projection
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.resolve import resolve_run

    model, dit, decoders = _options(o)
    run = resolve_run(model, dit, decoders, blocks=o.get("blocks"), text=False)  # the KV extension built first
    prof = run.profile
    t = time.perf_counter()
    comps = load_components(prof, None, dit_device=run.dit_device, vae_device=run.vae_device, dtype=prof.dtype,
                            seed=model.seed, with_text=False, decoders=decoders)
    res: dict = {"build_s": time.perf_counter() - t}
    for mode in o.get("modes", ["dit", "vae"]):
        res[mode] = bench_main(model, dit, decoders, backends=o["backends"], blocks=o.get("blocks"), mode=mode,
                               components=comps, on_update=lambda out, m=mode: emit({**res, m: out}),
                               **_run_kwargs(o))
    if "dit" in res and "vae" in res:
        res["projected"] = combine_projection(res["dit"], res["vae"])
    emit(res)


class _Recorder:
    """pytest plugin: every test's outcome (and a failure's message) into the entry's JSON the moment the
    test ends, so a run killed at its box still says what passed, what failed and why; the tests the
    deadline skipped (bench/pytest_deadline.py) are counted apart as ``not_run``."""

    def __init__(self, res: dict, emit):
        from pytest_deadline import REASON

        self.res, self.emit, self.not_run = res, emit, REASON
        res["tests"], res["counts"] = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "not_run": 0}
        res["running"] = None

    def pytest_runtest_logstart(self, nodeid, location):
        self.res["running"] = nodeid

    def pytest_runtest_logreport(self, report):
        # one record per test: its call (or the setup that failed or skipped it, or a teardown error)
        if report.when == "call" or report.outcome != "passed":
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            msg = report.longreprtext[-2000:] if report.outcome != "passed" else ""
            if outcome == "skipped" and self.not_run in msg:
                outcome = "not_run"
            self.res["counts"][outcome] += 1
            self.res["tests"].append({"name": report.nodeid, "outcome": outcome, "when": report.when,
                                      "time_s": round(report.duration, 2), "message": msg})
            self.emit(self.res)


def run_pytest(o: dict, emit) -> None:
    import pytest

    res: dict = {"args": o["args"]}
    if o.get("deadline_s"):  # from the entry's start: the KV extension's build counts against it
        res["deadline_s"] = o["deadline_s"]
        os.environ["HALLOLIVE_PYTEST_DEADLINE"] = str(time.time() + o["deadline_s"])
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
    if o.get("deadline_s"):  # PYTEST_PLUGINS (not -p): xdist workers inherit the environment, not every flag
        os.environ["PYTEST_PLUGINS"] = "pytest_deadline"
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))
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


def run_ncu(o: dict, emit, **kw) -> None:
    from gpu_ncu import run_ncu as run

    run(o, emit, failed=Failed, skipped=Skipped, **kw)


KIND_RUNNERS = {"check": run_check, "e2e": run_e2e, "stages": run_stages, "pytest": run_pytest,
                "script": run_script, "ncu": run_ncu}


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
    ap.add_argument("--card", default="gpu", help="the session's card slug: names the files an entry adds")
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
    runner = KIND_RUNNERS[entry.kind]
    if entry.kind == "ncu":
        runner = functools.partial(runner, card=a.card, out_dir=a.store.parent, box_s=a.box_s, dry_run=a.dry_run)
    try:
        runner(opts, emit)
    except Failed as e:
        status, code, meta["error"] = "failed", 1, str(e)
    except Skipped as e:
        status, meta["error"] = "skipped", str(e)
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
