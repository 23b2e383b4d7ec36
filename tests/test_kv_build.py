"""Building the KV extension where a GPU session will: the real CUDA root behind a wrapper nvcc, the arch
list and link libraries CMake generates against a CUDA build of torch's own CMake, the configure line
build.py passes, and `--kv-impl ext` refused in seconds (with the log's cause) before any weight loads.

The CUDA build of torch is simulated from this CPU wheel: a TorchConfig.cmake that runs torch's shipped
Caffe2/public/cuda.cmake (its FindCUDA, FindCUDAToolkit, the CMAKE_CUDA_ARCHITECTURES reset, the
-gencode flags and the cuBLAS/cuFFT/cuRAND targets) the way a CUDA wheel's Caffe2Config does, then the
real CPU targets, plus an empty stand-in for libc10_cuda.so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hallolive_rt.options import DiTOptions, ModelSource
from hallolive_rt.kvcache import build, cuda_toolkit
from hallolive_rt.kvcache.cuda_toolkit import find_toolkit_root, is_toolkit_root, torch_arch_list

REPO = Path(__file__).resolve().parents[1]


def _fake_toolkit(root: Path) -> Path:
    """A toolkit-shaped folder whose nvcc reports its root like the real one (``#$ TOP=<root>/bin/..``)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("// stand-in\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#\\$ TOP={root}/bin/.." >&2\n')
    nvcc.chmod(0o755)
    return root


def _wrapper(folder: Path, target: Path) -> Path:
    """A shell script named nvcc outside the toolkit, exec'ing the real one (as /usr/local/bin/nvcc can)."""
    (folder / "bin").mkdir(parents=True)
    w = folder / "bin" / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    w.chmod(0o755)
    return w


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDACXX", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_toolkit_root_behind_a_wrapper_nvcc(tmp_path, clean_env):
    root = _fake_toolkit(tmp_path / "cuda-13.0")
    wrap = _wrapper(tmp_path / "local", root / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{wrap.parent}:{os.environ['PATH']}")
    # torch's own idea of CUDA_HOME is the wrapper's grandparent, like FindCUDA's: not a toolkit
    clean_env.setattr(cuda_toolkit, "_torch_cuda_home", lambda: str(tmp_path / "local"))
    assert not is_toolkit_root(tmp_path / "local") and is_toolkit_root(root)
    found = find_toolkit_root()
    assert found == str(root.resolve()) and found.source == f"reported by {wrap}"
    # an explicit, valid CUDA_HOME wins; an invalid one is skipped
    clean_env.setenv("CUDA_HOME", str(tmp_path / "local"))
    assert find_toolkit_root() == str(root.resolve())
    other = _fake_toolkit(tmp_path / "other")
    clean_env.setenv("CUDA_HOME", str(other))
    assert find_toolkit_root() == str(other.resolve()) and find_toolkit_root().source == "$CUDA_HOME"


def test_toolkit_root_through_a_symlinked_nvcc(tmp_path, clean_env):
    root = _fake_toolkit(tmp_path / "cuda")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")  # reports nothing: the real path must do
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(root / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    clean_env.setattr(cuda_toolkit, "_torch_cuda_home", lambda: None)
    found = find_toolkit_root()
    assert found == str(root.resolve()) and found.source.startswith("real path of")


def test_arch_list_conversions(clean_env):
    assert torch_arch_list("90") == "9.0+PTX"
    assert torch_arch_list("80-real;90a") == "8.0;9.0a+PTX"
    with pytest.raises(ValueError, match="not a CMake CUDA architecture"):
        torch_arch_list("sm_90")
    clean_env.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert cuda_toolkit.cuda_archs() is None, "an explicit TORCH_CUDA_ARCH_LIST is left to CMakeLists.txt"
    assert build._cuda_archs("ON") == "env TORCH_CUDA_ARCH_LIST=9.0" and build._cuda_archs("OFF") == "None"


def test_configure_line_names_the_real_toolkit_and_the_archs(tmp_path, clean_env):
    root = _fake_toolkit(tmp_path / "cuda")
    calls = []
    clean_env.setattr(build, "_run", lambda cmd, log, env: calls.append((cmd, env)))
    inputs = {**build.build_inputs(), "cuda_kernels": "ON", "cuda_root": str(root), "cuda_archs": "90"}
    with pytest.raises(build.KVExtBuildError, match="does not exist"):  # nothing was really built
        build.build(build.source_dir(), tmp_path / "out", inputs)
    configure, env = calls[0]
    for flag in (f"-DCMAKE_CUDA_COMPILER={root}/bin/nvcc", f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
                 f"-DCUDAToolkit_ROOT={root}", "-DHALLOLIVE_KV_CUDA_ARCHS=90", "-DHALLOLIVE_KV_CUDA=ON"):
        assert flag in configure
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX" and env["CUDACXX"] == f"{root}/bin/nvcc"


def test_log_cause_picks_the_error_lines(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("\n".join([
        'hallolive_kv build {"cuda": "13.0"}', "$ cmake -S src -B out", "-- The CXX compiler identification is GNU",
        "CMake Error at /x/Caffe2Config.cmake:90 (message):", "  Your installed Caffe2 version uses CUDA but I",
        "  cannot find the CUDA libraries.", "Call Stack (most recent call first):", "  CMakeLists.txt:85 (include)",
        "", "-- Configuring incomplete, errors occurred!", "[1/3] Building CUDA object kv_cache_cuda.cu.o",
        "kv_cache_cuda.cu(12): error: identifier \"foo\" is undefined", "ld: undefined reference to `bar'",
        "ninja: build stopped: subcommand failed."]))
    cause = build.log_cause(log).splitlines()
    assert cause[:3] == ["CMake Error at /x/Caffe2Config.cmake:90 (message):",
                         "  Your installed Caffe2 version uses CUDA but I", "  cannot find the CUDA libraries."]
    assert 'kv_cache_cuda.cu(12): error: identifier "foo" is undefined' in cause
    assert "ld: undefined reference to `bar'" in cause
    assert not any(ln.startswith(("$ ", "hallolive_kv build", "[1/3]")) for ln in cause)


def test_kv_impl_ext_is_refused_before_any_weight_loads(tmp_path, monkeypatch):
    from hallolive_rt.runtime import bench, components

    assert build.require_kv_ext("torch") is None
    src = tmp_path / "src"
    shutil.copytree(build.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    cml = src / "CMakeLists.txt"
    cml.write_text('message(FATAL_ERROR "no compiler for you")\n' + cml.read_text())
    monkeypatch.setattr(build, "source_dir", lambda: src)
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(build.ENV_LIB, raising=False)

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the extension was checked")

    monkeypatch.setattr(components, "load_components", no_weights)
    with pytest.raises(ValueError) as err:  # KVExtUnavailable: reported like a refused option (InputError)
        bench.bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), DiTOptions(kv_impl="ext"),
                         backends=["eager"], blocks=1, mode="dit", out_json=None)
    assert isinstance(err.value.__cause__, build.KVExtUnavailable)
    msg = str(err.value)
    assert "no compiler for you" in msg and "--kv-impl torch" in msg and "build.log" in msg


def _fake_cuda_torch(prefix: Path, stub_c10_cuda: Path) -> Path:
    real = Path(torch.utils.cmake_prefix_path)
    (prefix / "Torch").mkdir(parents=True)
    (prefix / "Torch" / "TorchConfig.cmake").write_text(f"""
set(_real "{real}")
set(CAFFE2_USE_CUDA 1)
include("${{_real}}/Caffe2/public/utils.cmake")
set(_old "${{CMAKE_MODULE_PATH}}")
list(APPEND CMAKE_MODULE_PATH "${{_real}}/Caffe2")
include("${{_real}}/Caffe2/public/cuda.cmake")
set(CMAKE_MODULE_PATH "${{_old}}")
if(NOT CAFFE2_USE_CUDA)
  message(FATAL_ERROR "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries.")
endif()
include("${{_real}}/Torch/TorchConfig.cmake")
set(C10_CUDA_LIBRARY "{stub_c10_cuda}")
list(APPEND TORCH_LIBRARIES ${{C10_CUDA_LIBRARY}} caffe2::cufft caffe2::curand caffe2::cublas)
""")
    return prefix


def test_cmake_against_a_cuda_torch_behind_a_wrapper_nvcc(tmp_path, clean_env):
    """Configure cpp_ext/ as build.py does on a GPU machine whose PATH nvcc is a wrapper and whose toolkit
    has no cuBLAS: it must configure, build sm_90 code only, and link torch_cpu, c10, c10_cuda, cudart only."""
    root = find_toolkit_root()
    cmake, cc = shutil.which("cmake"), shutil.which("cc")
    if root is None or cmake is None or cc is None:
        pytest.skip("needs nvcc (a CUDA toolkit), cmake and cc")
    stub = tmp_path / "lib" / "libc10_cuda.so"
    stub.parent.mkdir()
    subprocess.run([cc, "-shared", "-x", "c", "-", "-o", str(stub)], input="int hallolive_stub;\n", text=True,
                   check=True)
    prefix = _fake_cuda_torch(tmp_path / "torch_cuda", stub)
    wrap = _wrapper(tmp_path / "wrap", Path(root) / "bin" / "nvcc")
    clean_env.setenv("PATH", f"{wrap.parent}:{os.environ['PATH']}")
    bdir = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    res = subprocess.run([cmake, "-S", str(REPO / "cpp_ext"), "-B", str(bdir), *gen, f"-DCMAKE_PREFIX_PATH={prefix}",
                          "-DHALLOLIVE_KV_CUDA=ON", "-DHALLOLIVE_KV_CUDA_ARCHS=90"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cache = build._cmake_cache(bdir, ("CUDA_TOOLKIT_ROOT_DIR", "HALLOLIVE_KV_CUDA_ARCHS_USED", "CMAKE_CUDA_COMPILER"))
    assert Path(cache["CUDA_TOOLKIT_ROOT_DIR"]).resolve() == Path(root), "torch's FindCUDA got the real root"
    assert cache["HALLOLIVE_KV_CUDA_ARCHS_USED"] == "90" and cache["CMAKE_CUDA_COMPILER"] == str(wrap)
    if not gen:
        pytest.skip("ninja not installed: the generated flags are checked in build.ninja")
    ninja = (bdir / "build.ninja").read_text()
    cu = re.search(r"build CMakeFiles/hallolive_kv\.dir/kv_cache_cuda\.cu\.o:.*?\n  FLAGS = (.*?)\n", ninja, re.S)
    assert cu, "no compile rule for kv_cache_cuda.cu"
    archs = re.findall(r"arch=compute_\w+,code=\S+", cu.group(1))
    assert archs == ["arch=compute_90,code=[compute_90,sm_90]\""], archs  # torch's own -gencode list is gone
    link = re.search(r"LINK_LIBRARIES = (.*)", ninja).group(1)
    for lib in ("libtorch_cpu.so", "libc10.so", "c10_cuda", "libcudart"):
        assert lib in link, (lib, link)
    for lib in ("cublas", "cufft", "curand", "cudnn", "nvrtc", "libtorch_cuda", "libtorch.so", "cudart_static"):
        assert lib not in link, (lib, link)
