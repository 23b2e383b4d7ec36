"""The GPU session driver behind `bash bench/gpu_session.sh` (``python bench/gpu_driver.py [--dry-run]
[--out DIR] [--budget-s 555] [--only a,b] [--box NAME=S] [--set NAME.OPTION=JSON] [--install MODE]``),
standard library only, since it runs before the package is importable: it records the machine, makes the
package importable from this checkout, then runs the entries of bench/gpu_variants.py in priority order,
each in its own process (bench/gpu_phase.py) and time box. An entry starts only if its whole box fits in
what is left of the budget (else "skipped"); one past its box is killed with its process group (SIGTERM,
then SIGKILL) and recorded "timeout", its JSON keeping every block it finished; one that raises is "error"
(message and traceback), one that dies without a word (a signal, out of host memory) "error" with its exit
code and the log's last lines; the next entry runs either way. Everything a phase prints goes to
``<card>-session.log``; this process prints one line per entry, then the viewer's table, then (last) the
table of entries, and keeps the session's record in ``<card>-session.json``. It writes at most 8 files,
each under 16 MiB, named ``<card>-<stem>`` (``bench/gpu_variants.py`` ``output_files``); ``--dry-run``:
tiny preset on CPU, card ``cpu-dryrun``, ``av`` and ``nvtx`` made unimportable in every phase."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_table import f as _f
from gpu_table import headline, table, viewer_table

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
BUDGET_S = 555          # 9 min 15 s: with a last entry's kill (20 s at most), 25 s under a 10-minute command
SETUP_BOX_S = 60
LOG_LIMIT = 15 * 2**20  # every file written stays under 16 MiB
SIMULATE_MISSING = "av,nvtx"
# how the package is made importable from this checkout, tried in order until an import probe finds it here
INSTALL_STEPS = {"auto": ["check", "pip", "farm"], "no-pip": ["check", "farm"], "check": ["check"],
                 "pip": ["check", "pip"], "farm": ["farm"]}

__all__ = ["Store", "REPO", "run_session", "main"]


# ---- results on disk ------------------------------------------------------------------------------------------

def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


class Store:
    """One entry's JSON: a whole file, or one key of a shared file (variants). Written atomically."""

    def __init__(self, path: Path, key: str | None = None):
        self.path, self.key = Path(path), key

    def _file(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def read(self) -> dict | None:
        data = self._file()
        return data.get(self.key) if self.key is not None else (data or None)

    def write(self, obj: dict) -> None:
        if self.key is None:
            _write_atomic(self.path, obj)
        else:
            data = self._file()
            data[self.key] = obj
            _write_atomic(self.path, data)

    def update_phase(self, **fields) -> dict:
        obj = self.read() or {}
        obj["phase"] = {**obj.get("phase", {}), **{k: v for k, v in fields.items() if v is not None}}
        self.write(obj)
        return obj


# ---- setup ----------------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 5), env=env, cwd=cwd)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return -1, f"{type(e).__name__}: {e}"


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA H200' -> 'h200'; anything else -> a filename-safe slug."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return m.group(1).lower() if m else (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu")


_PROBE = ("import hallolive_rt, hallolive_rt.runtime.bench, hallolive_rt.runtime.bench_check, torch; "
          "print('PROBE', hallolive_rt.__file__, '|', torch.__version__, torch.version.cuda, torch.cuda.is_available())")


def _farm(site: Path) -> Path:
    """hallolive_rt as a folder of symbolic links into this checkout (runtime/, export/, profiles/,
    cpp_ext/ placed inside it as installed): importable through PYTHONPATH, no pip needed."""
    pkg = site / "hallolive_rt"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    for item in (REPO / "hallolive_rt").iterdir():
        if item.name != "__pycache__":
            (pkg / item.name).symlink_to(item)
    for sub in ("export", "runtime", "profiles", "cpp_ext"):
        (pkg / sub).symlink_to(REPO / sub)
    return site


def setup(env: dict, dry_run: bool, install: str, work: Path, log) -> dict:
    """Machine facts, then the package importable from this checkout: "check" (already), "pip" (editable,
    no index, no dependencies) or "farm" (symlinks on PYTHONPATH), in the order INSTALL_STEPS gives."""
    # The commit the caller names wins: a copied working tree can carry a .git whose HEAD is older.
    rc, head = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"], 10)
    head = head.strip() if rc == 0 else None
    named = os.environ.get("HALLOLIVE_GIT_COMMIT")
    info: dict = {"python": sys.executable, "python_version": sys.version.split()[0], "install": None,
                  "git_commit": named or head, "git_commit_source": "$HALLOLIVE_GIT_COMMIT" if named else "git",
                  "git_head": head}
    if head is not None:  # tracked files that differ from that HEAD (a copy's .git can lag its tree)
        rc, changed = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], 10)
        info["git_tree_differs_from_head"] = (sorted(line.split(maxsplit=1)[-1] for line in changed.splitlines()
                                                     if line.strip()) if rc == 0 else None)
    deadline = time.time() + SETUP_BOX_S

    def left(cap: float) -> float:
        return min(cap, deadline - time.time())

    if not dry_run:
        rc, out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       left(20))
        info["nvidia_smi"] = out if rc == 0 else f"(nvidia-smi failed: {out[-300:]})"
        info["card"] = card_slug(out.split(",")[0]) if rc == 0 and out else "gpu"
    else:
        info["card"] = "cpu-dryrun"
    for tool, args in (("nvcc", ["--version"]), ("cmake", ["--version"]), ("ninja", ["--version"])):
        exe = shutil.which(tool)  # what the KV extension's build will use (d-cuda-tests)
        info[tool] = f"{exe}: {' / '.join(_run([exe, *args], left(10))[1].splitlines())[:240]}" if exe else \
            "not on PATH"
    for step in INSTALL_STEPS[install]:
        if step == "pip":
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                   "--disable-pip-version-check", "-e", str(REPO)]
            rc, out = _run(cmd, left(40), env)
            log.write(f"$ {' '.join(cmd)}\n{out}\n")
            info["pip"] = {"exit_code": rc, "tail": out[-800:]}
        elif step == "farm":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_farm(work / "site")),
                                                              env.get("PYTHONPATH", "")]))
            env["HALLOLIVE_PYTEST_APPEND"] = "1"  # pytest must not put the checkout's hallolive_rt first
        rc, out = _run([sys.executable, "-c", _PROBE], left(40), env, cwd=work)  # not the checkout's cwd
        m = re.search(r"^PROBE (.+) \| (.+)$", out, re.MULTILINE)
        info["probe"] = out[-1500:]
        if rc == 0 and m and Path(m.group(1)).resolve().is_relative_to(REPO.resolve()):
            info["install"], info["torch"] = step, m.group(2)
            break
    if info["install"] is None:
        info["error"] = "hallolive_rt.runtime cannot be imported from this checkout: every phase will fail"
    return info


# ---- the entries ---------------------------------------------------------------------------------------------

def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 20000))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_entry(entry, *, store: Store, box: float, preset: str, device: str, dry_run: bool, env: dict,
              log_path: Path, card: str, override: dict | None = None) -> dict:
    """Run one entry in its own process group under its time box; returns its final phase record."""
    cmd = [sys.executable, str(BENCH / "gpu_phase.py"), "--entry", entry.name, "--store", str(store.path),
           "--preset", preset, "--device", device, "--box-s", str(box), "--card", card]
    if override:
        cmd += ["--set-json", json.dumps(override)]
    if store.key is not None:
        cmd += ["--key", store.key]
    if dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {entry.name} ({entry.kind}, box {box:.0f} s) {time.strftime('%H:%M:%S')}\n$ "
                  f"{' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=box)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = proc.returncode, True
    elapsed = time.perf_counter() - t0
    rec = (store.read() or {}).get("phase", {})
    if timed_out:
        fields = {"status": "timeout", "error": f"killed after its {box:.0f} s box; finished blocks are kept"}
    elif rec.get("status") in ("ok", "skipped", "failed", "error") and \
            rc == (0 if rec.get("status") in ("ok", "skipped") else 1):
        fields = {"status": rec["status"]}
    else:  # died without recording why: a signal, out of memory, an import error before the first write
        fields = {"status": "error", "error": f"exit code {rc} without a recorded result; log tail:\n"
                                              f"{_tail(log_path)}"}
    return store.update_phase(name=entry.name, kind=entry.kind, box_s=box, wall_s=elapsed, exit_code=rc,
                              **fields)["phase"]


# ---- the session ---------------------------------------------------------------------------------------------

def run_session(out: Path, *, dry_run: bool = False, budget_s: float = BUDGET_S, only: list[str] | None = None,
                boxes: dict[str, float] | None = None, overrides: dict[str, dict] | None = None,
                install: str = "auto", t_start: float | None = None) -> dict:
    """Set up, run the entries, write <card>-session.json; returns it. ``boxes`` / ``overrides`` change an
    entry's time box / options for this session (by entry name)."""
    from gpu_variants import entries as registry

    t_start = t_start or time.time()
    deadline = t_start + budget_s
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("HALLOLIVE_SESSION_WORK", "/tmp/hallolive_gpu_session"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:
        env["HALLOLIVE_SIMULATE_MISSING"] = SIMULATE_MISSING
        env.setdefault("OMP_NUM_THREADS", "2")
    else:
        env.setdefault("OMP_NUM_THREADS", "8")
    preset, device = ("tiny", "cpu") if dry_run else ("hallolive-512x992", "cuda")
    boot_log = work / "setup.log"
    with open(boot_log, "w") as log:
        info = setup(env, dry_run, install, work, log)
    card = info["card"]
    log_path = out / f"{card}-session.log"
    log_path.write_text(boot_log.read_text() + f"setup: {json.dumps(info, indent=1)}\n")
    session = {"command": "bash bench/gpu_session.sh" + (" --dry-run" if dry_run else ""), "dry_run": dry_run,
               "card": card, "preset": preset, "device": device, "budget_s": budget_s,
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "setup": info,
               "setup_s": time.time() - t_start, "phases": [], "table": []}
    session_path = out / f"{card}-session.json"
    _write_atomic(session_path, session)
    say = _printer(log_path)
    say(f"setup: {card}, install {info['install']}, {info.get('nvidia_smi', 'CPU dry run')} "
        f"({session['setup_s']:.0f} s)")
    for entry in registry(only):
        box = float((boxes or {}).get(entry.name, entry.box(dry_run)))
        store = Store(out / f"{card}-{entry.file}.json", None if entry.own_file else entry.name)
        left = deadline - time.time()
        ran = box <= left
        if not ran:
            rec = {"name": entry.name, "kind": entry.kind, "status": "skipped", "box_s": box,
                   "error": f"{left:.0f} s of the budget left, box {box:.0f} s"}
        else:
            rec = run_entry(entry, store=store, box=box, preset=preset, device=device, dry_run=dry_run, env=env,
                            log_path=log_path, card=card, override=(overrides or {}).get(entry.name))
        rec["file"] = store.path.name + (f" [{store.key}]" if store.key else "")
        rec["headline"] = (headline(entry.kind, store.read()) or rec.get("error") or "") if ran else rec["error"]
        session["phases"].append({k: rec.get(k) for k in ("name", "kind", "status", "wall_s", "box_s", "exit_code",
                                                          "error", "file", "headline")})
        session["elapsed_s"] = time.time() - t_start
        _write_atomic(session_path, session)
        say(f"{entry.name}: {rec['status']} ({_f(rec.get('wall_s'), '.0f')} s) {rec['headline']}"[:600]
            + (f"\n  {str(rec.get('error'))[:600]}" if rec["status"] in ("error", "timeout", "failed") else ""))
    session["viewer_table"] = viewer_table(out, card)
    session["table"] = table(session["phases"])
    session["elapsed_s"] = time.time() - t_start
    _write_atomic(session_path, session)
    _cap_log(log_path)
    print("\n".join(["", *session["viewer_table"], "",
                     f"GPU session ({card}, {session['elapsed_s']:.0f} s of {budget_s:.0f}) -> {out}",
                     *session["table"]]), flush=True)
    return session


def _printer(log_path: Path):
    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as fh:
            fh.write(f"\n{line}\n")
    return say


def _cap_log(path: Path) -> None:
    """Keep the log under 16 MiB: its head and its tail."""
    size = path.stat().st_size
    if size <= LOG_LIMIT:
        return
    with open(path, "rb") as fh:
        head = fh.read(LOG_LIMIT // 4)
        fh.seek(size - LOG_LIMIT // 2)
        tail = fh.read()
    path.write_bytes(head + f"\n... [{size - len(head) - len(tail)} bytes cut] ...\n".encode() + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny preset on CPU, same phases and JSON schema")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else "
                    "bench/results/gpu-session, or /tmp/hallolive_gpu_dryrun with --dry-run)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole session, setup included")
    ap.add_argument("--only", default=None, help="comma-separated entry names (also opt-in ones)")
    ap.add_argument("--box", action="append", default=[], metavar="NAME=SECONDS", help="override a time box")
    ap.add_argument("--set", action="append", default=[], metavar="NAME.OPTION=JSON",
                    help="override an entry's option, e.g. c-stages.blocks=3 or b-e2e.backends='[\"eager\"]'")
    ap.add_argument("--install", choices=sorted(INSTALL_STEPS), default=None,
                    help="how the package is made importable: check (already), pip (editable, no index), farm "
                         "(symlinks on PYTHONPATH); auto = check, pip, farm (default); no-pip = check, farm "
                         "(default with --dry-run: a developer's environment is never changed)")
    a = ap.parse_args(argv)
    out = a.out or Path(os.environ.get("OUT") or
                        ("/tmp/hallolive_gpu_dryrun" if a.dry_run else REPO / "bench" / "results" / "gpu-session"))
    boxes = {}
    for spec in a.box:
        name, _, secs = spec.partition("=")
        boxes[name] = float(secs)
    overrides: dict[str, dict] = {}
    for spec in a.set:
        target, _, value = spec.partition("=")
        name, _, option = target.partition(".")
        if not option:
            ap.error(f"--set {spec}: expected NAME.OPTION=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value  # a bare string
        overrides.setdefault(name, {})[option] = parsed
    start = float(os.environ["HALLOLIVE_SESSION_T0"]) if os.environ.get("HALLOLIVE_SESSION_T0") else None
    run_session(out, dry_run=a.dry_run, budget_s=a.budget_s, only=a.only.split(",") if a.only else None,
                boxes=boxes, overrides=overrides, install=a.install or ("no-pip" if a.dry_run else "auto"),
                t_start=start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
