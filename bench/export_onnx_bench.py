"""CPU: export a preset to ONNX with random weights and record what it cost (time, peak memory, disk).

    python bench/export_onnx_bench.py --preset hallolive-512x992 --out-dir /tmp/hallolive-onnx --results bench/results

Runs ``hallolive-rt export --format onnx --random-weights`` in this process, one sub-model at a time, while a
thread samples the process's resident set (VmRSS, every 0.2 s). Writes
``<results>/cpu-export-onnx-<preset>.json``: per sub-model wall time, peak RSS, weights file and graph sizes,
node counts, and the machine (MemTotal, CPU count), versions and git commit. Every graph has passed
``check_onnx`` (checker, contract I/O, TensorRT lint) inside the export. The artifacts stay in --out-dir
unless --cleanup is given (the full preset writes ~34 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Highest VmRSS seen between start() and stop(), sampled on a thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hallolive-512x992")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--submodels", default="vae_video,audio,text,dit")
    ap.add_argument("--out-dir", default="/tmp/hallolive-onnx")
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--cleanup", action="store_true", help="delete --out-dir afterwards")
    args = ap.parse_args(argv)

    import onnx
    import torch

    from hallolive_rt.export.main import export_main
    from hallolive_rt.options import ModelSource

    out = Path(args.out_dir)
    subs = [s for s in args.submodels.split(",") if s]
    lines: list[str] = []

    def log(msg: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {msg}"
        lines.append(stamped)
        print(stamped, flush=True)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    result = {
        "what": "hallolive-rt export --format onnx --random-weights, one sub-model at a time, on CPU",
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit + ("+dirty" if dirty else ""),
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(_meminfo("MemTotal") / 2**30, 1),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": version("onnxscript"),
                     "onnx_ir": version("onnx_ir")},
        "preset": args.preset, "precision": args.precision, "complete": False, "submodels": {}, "log": lines,
    }
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"cpu-export-onnx-{args.preset}.json"
    for sub in subs:  # the JSON is rewritten after every sub-model: a failure keeps what was measured
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            manifest = export_main(ModelSource(args.preset, random_weights=True), "onnx", args.precision, out, submodels=(sub,), log=log)
        entry = {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(rss.peak / 2**30, 3)}
        m = json.loads(Path(manifest).read_text())
        wf = m["weights_files"][sub]
        entry["weights_file"] = {"file": wf["file"], "gib": round(wf["bytes"] / 2**30, 3)}
        entry["graphs"] = {}
        for key, a in m["artifacts"].items():
            if a["submodel"] == sub:
                g = onnx.load(str(out / a["file"]), load_external_data=False).graph
                entry["graphs"][key] = {"file": a["file"], "mb": round(a["bytes"] / 1e6, 2), "nodes": len(g.node),
                                        "initializers": len(g.initializer)}
        result["submodels"][sub] = entry
        result["peak_rss_gib"] = max(v["peak_rss_gib"] for v in result["submodels"].values())
        result["process_max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        result["disk_gib"] = round(sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**30, 2)
        result["complete"] = sub == subs[-1]
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}: peak RSS {result['peak_rss_gib']} GiB, {result['disk_gib']} GiB on disk")
    if args.cleanup:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
