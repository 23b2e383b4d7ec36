"""Where the CUDA toolkit really is (a root counts only if it holds ``bin/nvcc`` and ``cuda_runtime.h``,
so a wrapper script named nvcc outside the toolkit is followed, not trusted) and which GPU architectures to
build for, for ``build.py``. The order of candidates: ``docs/ARCHITECTURE.md``, "KV extension"."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["ToolkitRoot", "find_toolkit_root", "is_toolkit_root", "cuda_archs", "torch_arch_list"]


class ToolkitRoot(str):
    """A toolkit root path (a str) that remembers which candidate gave it (``.source``)."""

    source: str

    def __new__(cls, path: str | Path, source: str):
        obj = super().__new__(cls, str(path))
        obj.source = source
        return obj


def is_toolkit_root(path: str | Path | None) -> bool:
    if not path:
        return False
    p = Path(path)
    if not (p / "bin" / "nvcc").is_file():
        return False
    incs = [p / "include", *sorted((p / "targets").glob("*/include"))]
    return any((i / "cuda_runtime.h").is_file() for i in incs)


def _reported_root(nvcc: str) -> Path | None:
    """The root an nvcc (or a wrapper of one) reports in its dry-run listing (``#$ TOP=.../bin/..``)."""
    try:
        res = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    return Path(m.group(1).strip()).resolve() if m else None


def _torch_cuda_home() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - an odd torch install must not stop the search
        return None
    return CUDA_HOME


def _pip_toolkits() -> list[Path]:
    try:
        import torch
    except ImportError:
        return []
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return [nvidia / name for name in ("cu13", "cu12", "cuda_nvcc")]


def find_toolkit_root() -> ToolkitRoot | None:
    """The CUDA toolkit root (see the module docstring), or None when no valid one exists."""
    nvcc = shutil.which("nvcc")
    candidates = [(os.environ.get("CUDA_HOME"), "$CUDA_HOME"), (os.environ.get("CUDA_PATH"), "$CUDA_PATH")]
    if nvcc:
        candidates.append((lambda: _reported_root(nvcc), f"reported by {nvcc}"))
        candidates.append((Path(nvcc).resolve().parent.parent, f"real path of {nvcc}"))
    candidates += [(_torch_cuda_home, "torch.utils.cpp_extension.CUDA_HOME"), ("/usr/local/cuda", "default")]
    candidates += [(p, "pip wheel") for p in _pip_toolkits()]
    for cand, source in candidates:
        path = cand() if callable(cand) else cand
        if is_toolkit_root(path):
            return ToolkitRoot(Path(path).resolve(), source)
    return None


def torch_arch_list(archs: str) -> str:
    """CMake architectures ("90", "80;90a-real") -> TORCH_CUDA_ARCH_LIST syntax ("9.0+PTX", "8.0+PTX;9.0a")."""
    out = []
    for a in archs.split(";"):
        m = re.fullmatch(r"(\d+)(\d)([a-z]?)(-real|-virtual)?", a.strip())
        if m is None:
            raise ValueError(f"not a CMake CUDA architecture: {a!r} (expected e.g. 90 or 90-real)")
        out.append(f"{m.group(1)}.{m.group(2)}{m.group(3)}" + ("" if m.group(4) == "-real" else "+PTX"))
    return ";".join(out)


def cuda_archs() -> str | None:
    """Architectures to build, in CMake syntax: None when TORCH_CUDA_ARCH_LIST is set (CMakeLists.txt
    reads it then), else every visible GPU's own ("90" = sm_90 code + PTX), else None (CMake's default)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}{minor}" for major, minor in caps)
