"""Build-on-first-use of the hallolive_kv extension (cpp_ext/) and loading it into torch.ops.

Why on first use and not at install: the package installs with plain setuptools (no compiler, no torch
needed to build the wheel), while the extension must match the torch that is actually imported. So the
first `hallolive_rt.kvcache.ops` import configures and builds cpp_ext/ with CMake into

    $HALLOLIVE_KV_CACHE_DIR or ~/.cache/hallolive_rt/kv_ext / <build key> /

where the build key hashes the sources, torch, Python, CUDA and the GPU architecture. Changed sources give
a new key, so a stale library is never loaded: it is rebuilt. A lock file serialises concurrent builds.
A failed build raises KVExtBuildError with the log path; nothing falls back to torch silently (the torch
path is an explicit choice: get_kv_ops("torch") / `--kv-impl torch`).

HALLOLIVE_KV_LIB=/path/libhallolive_kv.so loads a prebuilt library instead (e.g. from the root
`cmake --build build`); HALLOLIVE_KV_CUDA=AUTO|ON|OFF overrides the CUDA choice passed to CMake.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ENV_LIB = "HALLOLIVE_KV_LIB"
ENV_CACHE = "HALLOLIVE_KV_CACHE_DIR"
ENV_CUDA = "HALLOLIVE_KV_CUDA"
LIB_NAME = "libhallolive_kv.dylib" if sys.platform == "darwin" else "libhallolive_kv.so"
STAMP = "build.json"
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")

_loaded: Path | None = None


class KVExtBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and where the log is."""


def source_dir() -> Path:
    """cpp_ext/ as installed: the repository folder (editable) or site-packages/hallolive_rt/cpp_ext."""
    import hallolive_rt.cpp_ext as pkg

    return Path(pkg.__file__).resolve().parent


def source_files(src: Path) -> list[Path]:
    files = [p for p in src.iterdir() if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.name == "CMakeLists.txt")]
    if not any(p.name == "CMakeLists.txt" for p in files):
        raise KVExtBuildError(f"no CMakeLists.txt in {src}: the hallolive_rt.cpp_ext sources are missing "
                              "from this installation (reinstall the package)")
    return sorted(files, key=lambda p: p.name)


def _want_cuda() -> str:
    """ON when this torch can run CUDA kernels (a missing nvcc is then a build error, not a CPU-only lib)."""
    forced = os.environ.get(ENV_CUDA)
    if forced:
        return forced.upper()
    return "ON" if torch.version.cuda is not None and torch.cuda.is_available() else "OFF"


def _cuda_arch() -> str | None:
    if _want_cuda() == "OFF" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def build_inputs(src: Path | None = None) -> dict[str, str]:
    """Everything a built library depends on besides the compiler: what the build key hashes."""
    src = source_dir() if src is None else src
    digest = hashlib.sha256()
    for p in source_files(src):
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {
        "sources": digest.hexdigest(),
        "torch": torch.__version__,
        "python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}",
        "cuda": str(torch.version.cuda),
        "cuda_kernels": _want_cuda(),
        "cuda_arch": str(_cuda_arch()),
        "cxx11_abi": str(torch.compiled_with_cxx11_abi()),
        "machine": f"{sys.platform}-{platform.machine()}",
    }


def build_key(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "hallolive_rt" / "kv_ext"


def is_built(out: Path, key: str) -> bool:
    """A build counts only with its library and a stamp naming this exact key (written last)."""
    stamp = out / STAMP
    if not (stamp.is_file() and (out / LIB_NAME).is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl  # POSIX only, like the rest of the build

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise KVExtBuildError(f"building the hallolive_kv extension failed (exit {proc.returncode} from "
                              f"{Path(cmd[0]).name}); full log: {log}\n{_tail(log)}")


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def build(src: Path, out: Path, inputs: dict[str, str]) -> Path:
    """Configure + build cpp_ext/ into out/ with CMake; returns the library path. Caller holds the lock."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise KVExtBuildError("cmake >= 3.18 is needed to build the hallolive_kv extension on first use: "
                              "`pip install cmake ninja` (or point HALLOLIVE_KV_LIB at a prebuilt library)")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text(f"hallolive_kv build {json.dumps(inputs, sort_keys=True)}\n")
    env = dict(os.environ)
    if inputs["cuda_kernels"] != "OFF" and "CUDACXX" not in env:
        from torch.utils.cpp_extension import CUDA_HOME  # finds nvcc outside PATH (/usr/local/cuda)

        if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            env["CUDACXX"] = str(Path(CUDA_HOME) / "bin" / "nvcc")
    configure = [cmake, "-S", str(src), "-B", str(out / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DHALLOLIVE_KV_CUDA={inputs['cuda_kernels']}"]
    if inputs["cuda_arch"] != "None":
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={inputs['cuda_arch']}")
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS") or str(min(os.cpu_count() or 1, 8))
    print(f"hallolive_rt: building the KV-cache extension (first use with these sources, ~1-2 min) "
          f"in {out}; log: {log}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    _run(configure, log, env)
    _run([cmake, "--build", str(out / "build"), "--parallel", jobs], log, env)
    built = out / "build" / LIB_NAME
    if not built.is_file():
        raise KVExtBuildError(f"CMake finished but {built} does not exist; log: {log}")
    tmp = out / (LIB_NAME + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, out / LIB_NAME)  # atomic: a reader never sees half a library
    (out / STAMP).write_text(json.dumps({"key": build_key(inputs), **inputs}, indent=1, sort_keys=True))
    print(f"hallolive_rt: KV-cache extension built in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return out / LIB_NAME


def library_path() -> Path:
    """Path of an up-to-date library for this environment, building it if needed."""
    prebuilt = os.environ.get(ENV_LIB)
    if prebuilt:
        path = Path(prebuilt).expanduser()
        if not path.is_file():
            raise KVExtBuildError(f"{ENV_LIB}={prebuilt} does not exist: build it with the root CMakeLists.txt "
                                  f"or unset {ENV_LIB} to build on first use")
        return path
    src = source_dir()
    inputs = build_inputs(src)
    key = build_key(inputs)
    out = cache_root() / key
    if is_built(out, key):
        return out / LIB_NAME
    with _locked(cache_root() / f"{key}.lock"):
        if is_built(out, key):  # another process finished it while we waited
            return out / LIB_NAME
        return build(src, out, inputs)


def load_library() -> Path:
    """Load the extension once per process (torch.ops.hallolive_kv.*); returns the library path."""
    global _loaded
    if _loaded is None:
        path = library_path()
        try:
            torch.ops.load_library(str(path))
        except OSError as err:
            raise KVExtBuildError(f"cannot load the hallolive_kv extension {path}: {err}") from err
        _loaded = path
    return _loaded
