"""Build-on-first-use of the hallolive_kv extension (``cpp_ext/``) with CMake, into a directory keyed by a
hash of the sources, torch, Python, CUDA and the GPU architecture (a stale library is never loaded), under
a lock, and loading it into ``torch.ops``; a failed build raises ``KVExtBuildError`` with the log path,
never a silent fall-back. ``require_kv_ext(kv_impl, device)`` builds it while a command checks its options,
before any weight loads. Paths, variables and the CUDA toolkit: ``docs/ARCHITECTURE.md``, "KV extension"."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .cuda_toolkit import cuda_archs, find_toolkit_root, torch_arch_list

ENV_LIB = "HALLOLIVE_KV_LIB"
ENV_CACHE = "HALLOLIVE_KV_CACHE_DIR"
ENV_CUDA = "HALLOLIVE_KV_CUDA"
LIB_NAME = "libhallolive_kv.dylib" if sys.platform == "darwin" else "libhallolive_kv.so"
STAMP = "build.json"
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")

_loaded: Path | None = None


class KVExtBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and where the log is."""


class KVExtUnavailable(KVExtBuildError, ValueError):
    """``--kv-impl ext`` was asked for and cannot be had here: refused like a bad option (exit code 2)."""


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
    if forced := os.environ.get(ENV_CUDA):
        return forced.upper()
    return "ON" if torch.version.cuda is not None and torch.cuda.is_available() else "OFF"


def _cuda_archs(want: str) -> str:
    """The architectures asked of CMake: the visible GPUs' ("90"), "env TORCH_CUDA_ARCH_LIST=..." (CMake
    reads it) or "default" (CMakeLists.txt's own list); "None" without CUDA kernels."""
    if want == "OFF":
        return "None"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f"env TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    return cuda_archs() or "default"


def build_inputs(src: Path | None = None) -> dict[str, str]:
    """Everything a built library depends on besides the compiler: what the build key hashes."""
    src = source_dir() if src is None else src
    digest = hashlib.sha256()
    for p in source_files(src):
        digest.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    want = _want_cuda()
    root = find_toolkit_root() if want != "OFF" else None
    return {
        "sources": digest.hexdigest(),
        "torch": torch.__version__,
        "python": f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}",
        "cuda": str(torch.version.cuda),
        "cuda_kernels": want,
        "cuda_archs": _cuda_archs(want),
        "cuda_root": str(root),
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
                              f"{Path(cmd[0]).name}); the cause, from the log:\n{log_cause(log)}\nfull log: {log}")


_CAUSE = re.compile(r"error|fatal|undefined reference|cannot find|not found|no such file|could not|failed",
                    re.IGNORECASE)


def log_cause(log: Path, limit: int = 20) -> str:
    """The lines of a build log that say why it failed: CMake error blocks (the message under
    "CMake Error at ..."), compiler and linker errors; the log's last lines when none match."""
    lines = log.read_text(errors="replace").splitlines()
    picked: list[str] = []
    i = 0
    while i < len(lines) and len(picked) < limit:
        ln = lines[i]
        if ln.startswith("CMake Error"):
            picked.append(ln)
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")) and len(picked) < limit:
                if lines[i].strip() and not lines[i].lstrip().startswith(("Call Stack", "/", "CMakeLists")):
                    picked.append(lines[i])
                i += 1
            continue
        if _CAUSE.search(ln) and not ln.startswith(("$ ", "-- ", "hallolive_kv build ")):
            picked.append(ln)
        i += 1
    if not picked:
        picked = lines[-limit:]
    return "\n".join(dict.fromkeys(ln.rstrip() for ln in picked))  # drop repeats, keep order


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
    configure = [cmake, "-S", str(src), "-B", str(out / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DHALLOLIVE_KV_CUDA={inputs['cuda_kernels']}"]
    root, archs = inputs.get("cuda_root", "None"), inputs.get("cuda_archs", "None")
    if inputs["cuda_kernels"] != "OFF" and root != "None":
        # the real toolkit for CMake's CUDA language and for torch's FindCUDA / FindCUDAToolkit alike
        nvcc = str(Path(root) / "bin" / "nvcc")
        env.setdefault("CUDACXX", nvcc)
        configure += [f"-DCMAKE_CUDA_COMPILER={env['CUDACXX']}", f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
                      f"-DCUDAToolkit_ROOT={root}"]
    if archs not in ("None", "default") and not archs.startswith("env "):
        configure.append(f"-DHALLOLIVE_KV_CUDA_ARCHS={archs}")
        env["TORCH_CUDA_ARCH_LIST"] = torch_arch_list(archs)  # spares torch's CMake its GPU probe
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
    built_with = _cmake_cache(out / "build", ("HALLOLIVE_KV_CUDA_ARCHS_USED", "CUDA_TOOLKIT_ROOT_DIR",
                                              "CMAKE_CUDA_COMPILER"))
    (out / STAMP).write_text(json.dumps({"key": build_key(inputs), **inputs, "built_with": built_with},
                                        indent=1, sort_keys=True))
    print(f"hallolive_rt: KV-cache extension built in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return out / LIB_NAME


def _cmake_cache(build_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Values of ``names`` in a CMake build folder's CMakeCache.txt (what was actually configured)."""
    found: dict[str, str] = {}
    try:
        text = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    except OSError:
        return found
    for ln in text.splitlines():
        name, _, rest = ln.partition(":")
        if name in names and "=" in rest:
            found[name] = rest.split("=", 1)[1]
    return found


def library_path() -> Path:
    """Path of an up-to-date library for this environment, building it if needed."""
    if prebuilt := os.environ.get(ENV_LIB):
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


def build_info(path: Path | None = None) -> dict:
    """What a library was built from: its stamp (build inputs, architectures, toolkit root), or for a
    prebuilt HALLOLIVE_KV_LIB just its path."""
    path = Path(path or _loaded or library_path())
    stamp = path.parent / STAMP
    info: dict = {"library": str(path)}
    if stamp.is_file():
        try:
            info.update(json.loads(stamp.read_text()))
        except ValueError:
            pass
    return info


def require_kv_ext(kv_impl: str, device: str | torch.device | None = None) -> dict | None:
    """Validation step of any command that takes ``--kv-impl``: for "ext", build (or find) and load the
    extension now, before any weight is loaded; with a CUDA ``device`` it must have its CUDA kernels.
    Returns build_info() (None for "torch"); raises KVExtUnavailable (a ValueError) with the build log's
    error lines and the way around it (``--kv-impl torch``)."""
    if kv_impl != "ext":
        return None
    t = time.perf_counter()
    try:
        path = load_library()
    except KVExtBuildError as e:
        raise KVExtUnavailable(f"--kv-impl ext: {e}\n(pass --kv-impl torch to run on the pure-torch KV ops)") from e
    if device is not None and torch.device(device).type == "cuda":
        if not torch._C._dispatch_has_kernel_for_dispatch_key("hallolive_kv::write_block", "CUDA"):
            raise KVExtUnavailable(f"--kv-impl ext on {device}: the extension {path} was built without its CUDA "
                                   f"kernels (HALLOLIVE_KV_CUDA={os.environ.get(ENV_CUDA, 'AUTO')}, torch CUDA "
                                   f"{torch.version.cuda}); rebuild with nvcc available, or pass --kv-impl torch")
    return {**build_info(path), "ready_s": time.perf_counter() - t}
