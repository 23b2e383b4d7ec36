"""The hallolive_kv extension against its pure-torch reference, its registration, its build.

CPU tests build the extension on first use (~30 s once per source change, cached under
~/.cache/hallolive_rt/kv_ext); the CMake test configures and builds the root project from scratch.
CUDA tests are marked and skip without a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hallolive_rt.kvcache import build, get_kv_ops, reference
from tests.conftest import assert_close

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# fp32: the same products in a different order/contraction; bf16/fp16: at most one rounding step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}

# (B, S, H, D, N, offset, ring_start, ring_size): odd sizes, D/2 odd, wrap-around, sink + ring, a block
# crossing from the sink into the ring, a logical offset far past S, a plain write ending exactly at S.
CASES = [
    (1, 16, 2, 8, 5, 3, 0, 0),
    (2, 13, 3, 6, 7, 6, 0, 0),
    (2, 11, 3, 10, 4, 9, 0, 11),
    (1, 20, 1, 2, 6, 17, 4, 16),
    (3, 9, 2, 12, 5, 1, 2, 7),
    (2, 33, 5, 14, 9, 1000, 3, 29),
    (1, 8, 4, 16, 3, 0, 8, 0),
]


@pytest.fixture(scope="module")
def ext():
    return get_kv_ops("ext")


def _angles(n: int, half: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 5000, (n, 1), device=device).float()
    inv = 10000.0 ** (-torch.arange(half, device=device).float() / half)
    ang = pos * inv  # [n, D/2]
    return ang.cos(), ang.sin()


def _case(case, dtype, device="cpu"):
    b, s, h, d, n, off, rs, rz = case
    cache = torch.randn(b, s, h, d, device=device).to(dtype)
    src = torch.randn(b, n, h, d, device=device).to(dtype)
    cos, sin = _angles(n, d // 2, device)
    return cache, src, cos, sin, torch.tensor([off], device=device), rs, rz


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_write_ops_match_reference(ext, case, dtype):
    cache, src, cos, sin, offset, rs, rz = _case(case, dtype)
    got, want = cache.clone(), cache.clone()
    ext.write_block(got, src, offset, rs, rz)
    reference.write_block(want, src, offset, rs, rz)
    assert torch.equal(got, want), "write_block is a copy and must be bit-exact"
    got, want = cache.clone(), cache.clone()
    ext.rope_write_block(got, src, cos, sin, offset, rs, rz)
    reference.rope_write_block(want, src, cos, sin, offset, rs, rz)
    assert_close(got, want, **TOL[dtype], what=f"rope_write_block {case} {dtype}")


def test_slot_mapping_by_hand():
    # sink [0, 2), ring [2, 6): logical 4..8 -> 4, 5, 2, 3, 4 (the last row overwrites the first)
    slots = reference.physical_slots(torch.tensor([4]), 4, ring_start=2, ring_size=4)
    assert slots.tolist() == [4, 5, 2, 3]
    slots = reference.physical_slots(torch.tensor([1]), 3, ring_start=2, ring_size=4)
    assert slots.tolist() == [1, 2, 3]


def test_strided_src(ext):
    # K as a slice of a fused QKV projection: non-contiguous in N and H, dense in D.
    qkv = torch.randn(2, 7, 3, 4, 8)
    k = qkv[:, :, 1]
    assert not k.is_contiguous()
    cache = torch.zeros(2, 12, 4, 8)
    cos, sin = _angles(7, 4)
    got, want = cache.clone(), cache.clone()
    offset = torch.tensor([9])
    ext.rope_write_block(got, k, cos, sin, offset, 2, 10)
    reference.rope_write_block(want, k, cos, sin, offset, 2, 10)
    assert_close(got, want, **TOL[torch.float32], what="strided src")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rerotate_matches_reference_and_composes(ext, dtype):
    b, s, h, d, start, length = 2, 15, 3, 10, 4, 9
    cache = torch.randn(b, s, h, d).to(dtype)
    cos, sin = _angles(length, d // 2)
    got, want = cache.clone(), cache.clone()
    ext.rerotate(got, cos, sin, start, length)
    reference.rerotate(want, cos, sin, start, length)
    assert_close(got, want, **TOL[dtype], what=f"rerotate {dtype}")
    assert torch.equal(got[:, :start], cache[:, :start]) and torch.equal(got[:, start + length:],
                                                                         cache[:, start + length:])
    if dtype is torch.float32:  # RoPE composes: rotate to p, then by delta == rotate to p + delta
        half = d // 2
        inv = 10000.0 ** (-torch.arange(half).float() / half)
        p = torch.arange(length).float()[:, None] * inv
        delta = torch.full((length, 1), -37.0) * inv
        x = torch.randn(b, length, h, d)
        rows = torch.zeros(b, s, h, d)
        ext.rope_write_block(rows, x, p.cos(), p.sin(), torch.tensor([start]))
        ext.rerotate(rows, delta.cos(), delta.sin(), start, length)
        direct = reference.apply_rope_pairs(x, (p + delta).cos(), (p + delta).sin())
        assert_close(rows[:, start:start + length], direct, rtol=1e-4, atol=1e-5, what="rerotate composes")


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_boundary_errors_name_argument_and_shapes(impl):
    ops = get_kv_ops(impl)
    cache = torch.zeros(1, 8, 2, 4)
    off = torch.tensor([0])
    with pytest.raises(RuntimeError, match=r"`src` must have shape \[B=1, N, H=2, D=4\].*got \[1, 3, 3, 4\]"):
        ops.write_block(cache, torch.zeros(1, 3, 3, 4), off)
    with pytest.raises(RuntimeError, match=r"`src` dtype must equal `cache` dtype torch.float32, got torch.bfloat16"):
        ops.write_block(cache, torch.zeros(1, 3, 2, 4, dtype=torch.bfloat16), off)
    with pytest.raises(RuntimeError, match=r"`offset` dtype must be int64, got torch.int32"):
        ops.write_block(cache, torch.zeros(1, 3, 2, 4), off.int())
    with pytest.raises(RuntimeError, match=r"`offset` must have shape \[1\], got \[\]"):
        ops.write_block(cache, torch.zeros(1, 3, 2, 4), torch.tensor(0))
    with pytest.raises(RuntimeError, match=r"`cos` must have shape \[3, 2\] \(rows, D/2\), got \[3, 4\]"):
        ops.rope_write_block(cache, torch.zeros(1, 3, 2, 4), torch.ones(3, 4), torch.zeros(3, 4), off)
    with pytest.raises(RuntimeError, match=r"N=3 rows would overwrite itself in a ring of ring_size=2"):
        ops.write_block(cache, torch.zeros(1, 3, 2, 4), off, 0, 2)
    with pytest.raises(RuntimeError, match=r"rows \[start=6, start\+length=10\) must lie inside"):
        ops.rerotate(cache, torch.ones(4, 2), torch.zeros(4, 2), 6, 4)


def test_cpu_refuses_plain_write_past_the_end(ext):
    cache = torch.zeros(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match=r"block \[offset=6, offset\+N=9\) must fit in the cache's S=8"):
        ext.write_block(cache, torch.zeros(1, 3, 2, 4), torch.tensor([6]))
    with pytest.raises(RuntimeError, match=r"`offset` must be >= 0, got -1"):
        ext.write_block(cache, torch.zeros(1, 3, 2, 4), torch.tensor([-1]), 0, 4)


def test_opcheck(ext):
    cache, src, cos, sin, offset, rs, rz = _case(CASES[3], torch.float32)
    ops = torch.ops.hallolive_kv
    torch.library.opcheck(ops.write_block.default, (cache.clone(), src, offset, rs, rz))
    torch.library.opcheck(ops.rope_write_block.default, (cache.clone(), src, cos, sin, offset, rs, rz))
    torch.library.opcheck(ops.rerotate.default, (cache.clone(), cos[:5], sin[:5], 2, 5))


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_compile_fullgraph_matches_eager(impl):
    """One attention-like step: project, rope-write K, write V, re-base, read the cache back. Both
    implementations must trace without graph breaks (the torch one backs `--kv-impl torch`)."""
    ext = get_kv_ops(impl)
    b, s, h, d, n = 1, 24, 2, 8, 6

    def step(cache_k, cache_v, x, w, cos, sin, offset):
        k = (x @ w).view(b, n, h, d)
        ext.rope_write_block(cache_k, k, cos, sin, offset, 4, 20)
        ext.write_block(cache_v, k * 2, offset, 4, 20)
        ext.rerotate(cache_k, cos[:4], sin[:4], 0, 4)
        return cache_k.sum(dim=(2, 3)) + cache_v.sum(dim=(2, 3))

    compiled = torch.compile(step, fullgraph=True)
    x, w = torch.randn(b, n, 16), torch.randn(16, h * d)
    cos, sin = _angles(n, d // 2)
    state_e = [torch.zeros(b, s, h, d), torch.zeros(b, s, h, d)]
    state_c = [t.clone() for t in state_e]
    for block in range(4):  # the offset moves and wraps; the same compiled graph serves every block
        offset = torch.tensor([4 + 6 * block])
        want = step(*state_e, x, w, cos, sin, offset)
        with torch._dynamo.config.patch(error_on_recompile=block > 0):
            got = compiled(*state_c, x, w, cos, sin, offset)
        assert_close(got, want, rtol=1e-5, atol=1e-4, what=f"compiled step, block {block}")
        for c, e in zip(state_c, state_e):
            assert_close(c, e, rtol=1e-5, atol=1e-5, what=f"compiled cache, block {block}")


def test_stale_build_detection(tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(build.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    inputs = build.build_inputs(src)
    key = build.build_key(inputs)
    assert key == build.build_key(build.build_inputs(src)), "the key must be deterministic"
    (src / "kv_cache_cpu.cpp").write_text((src / "kv_cache_cpu.cpp").read_text() + "\n// edit\n")
    assert build.build_key(build.build_inputs(src)) != key, "a source edit must change the build key"
    assert build.build_key({**inputs, "torch": "0.0.0"}) != key, "another torch must change the key"
    assert build.build_key({**inputs, "python": "cpython-3.99"}) != key

    out = tmp_path / "out"
    out.mkdir()
    assert not build.is_built(out, key)
    (out / build.LIB_NAME).write_bytes(b"")
    (out / build.STAMP).write_text('{"key": "%s"}' % key)
    assert build.is_built(out, key)
    assert not build.is_built(out, "0" * 16), "a stamp for other inputs is stale: rebuild"

    monkeypatch.setenv(build.ENV_LIB, str(tmp_path / "missing.so"))
    with pytest.raises(build.KVExtBuildError, match="missing.so does not exist"):
        build.library_path()


def test_build_failure_names_the_log(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    src = tmp_path / "src"
    shutil.copytree(build.source_dir(), src, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    # Broken at configure time: the failure path is what is tested, not the compiler's speed.
    cml = src / "CMakeLists.txt"
    cml.write_text('message(FATAL_ERROR "deliberately broken")\n' + cml.read_text())
    inputs = {**build.build_inputs(src), "cuda_kernels": "OFF", "cuda_archs": "None", "cuda_root": "None"}
    with pytest.raises(build.KVExtBuildError, match=r"full log: .*build\.log") as err:
        build.build(src, tmp_path / "out", inputs)
    assert "deliberately broken" in str(err.value).split("full log:")[0], "the cause comes before the path"
    assert not build.is_built(tmp_path / "out", build.build_key(inputs))


def test_cmake_configure_and_build_root_project(tmp_path):
    """`cmake -S . -B build && cmake --build build` from the README, then the library serves its ops."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    bdir = tmp_path / "build"
    subprocess.run([cmake, "-S", str(REPO), "-B", str(bdir), *gen,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(bdir), "--parallel", "2"], check=True, capture_output=True)
    lib = bdir / build.LIB_NAME
    assert lib.is_file()
    # A fresh process: this one already holds the cached build of the same TORCH_LIBRARY namespace.
    code = textwrap.dedent("""
        import torch
        from hallolive_rt.kvcache import reference
        from hallolive_rt.kvcache import ops
        cache, want = torch.zeros(1, 6, 1, 4), torch.zeros(1, 6, 1, 4)
        src, off = torch.randn(1, 3, 1, 4), torch.tensor([4])
        ops.write_block(cache, src, off, 1, 5)
        reference.write_block(want, src, off, 1, 5)
        assert torch.equal(cache, want)
        print("ok", ops.build.load_library())
    """)
    env = {**os.environ, build.ENV_LIB: str(lib)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"ok {lib}"


def test_write_bench_script_checks_agreement_and_records_its_environment(tmp_path):
    """bench/kv_write_bench.py (the committed microbenchmark) runs, and only times ops that agree."""
    out = tmp_path / "kv.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "kv_write_bench.py"), "--device", "cpu", "--tiny",
                          "--dtype", "float32", "--warmup", "1", "--iters", "3", "--repeat", "2", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    rec = json.loads(out.read_text())
    for op in ("rope_write_block", "write_block", "rerotate"):
        assert rec["agreement"][op]["max_abs_diff"] == 0.0  # same fp32 math, same rounding on CPU
        assert rec["agreement"][op]["max_abs_ref"] > 0
        for impl in ("ext", "torch"):
            r = rec["results"][f"{op}/{impl}"]
            assert len(r["raw_s"]) == 3 and all(t > 0 for t in r["raw_s"])
            assert r["median_s"] == sorted(r["raw_s"])[1]
        assert rec["results"][f"{op}/speedup"] > 0
    assert rec["env"]["torch"] == torch.__version__ and rec["env"]["git_commit"]
    assert rec["shapes"]["cache"] == [1, 120, 4, 32] and isinstance(rec["kv_ext_cuda_kernels"], bool)


# --------------------------------------------------------------------------- CUDA (skip without a GPU)

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cuda_ops_match_cpu_reference(ext, case, dtype):
    from hallolive_rt.kvcache import ops

    assert ops.has_cuda_kernels(), "the extension was built without its CUDA kernels"
    cache, src, cos, sin, offset, rs, rz = _case(case, dtype)
    for name in ("write_block", "rope_write_block"):
        args = (src, cos, sin) if name == "rope_write_block" else (src,)
        want = cache.clone()
        getattr(reference, name)(want, *args, offset, rs, rz)
        got = cache.cuda()
        getattr(ext, name)(got, *(a.cuda() for a in args), offset.cuda(), rs, rz)
        assert_close(got.cpu(), want, **TOL[dtype], what=f"cuda {name} {case} {dtype}")
    want, got = cache.clone(), cache.cuda()
    n = min(case[1], case[4])
    reference.rerotate(want, cos[:n], sin[:n], 0, n)
    ext.rerotate(got, cos[:n].cuda(), sin[:n].cuda(), 0, n)
    assert_close(got.cpu(), want, **TOL[dtype], what=f"cuda rerotate {case} {dtype}")


@pytest.mark.cuda
def test_cuda_graph_replays_with_moving_offset(ext):
    b, s, h, d, n, rs, rz = 1, 40, 4, 128, 6, 4, 36
    dev = torch.device("cuda")
    cache_k = torch.zeros(b, s, h, d, device=dev, dtype=torch.bfloat16)
    cache_v = torch.zeros_like(cache_k)
    src = torch.zeros(b, n, h, d, device=dev, dtype=torch.bfloat16)
    cos, sin = torch.ones(n, d // 2, device=dev), torch.zeros(n, d // 2, device=dev)
    offset = torch.zeros(1, dtype=torch.int64, device=dev)

    def body():
        ext.rope_write_block(cache_k, src, cos, sin, offset, rs, rz)
        ext.write_block(cache_v, src, offset, rs, rz)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the ops raises here
        try:
            body()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    want_k = torch.zeros(b, s, h, d, dtype=torch.bfloat16)
    want_v = torch.zeros_like(want_k)
    for block in range(12):  # 12 * 6 rows: the ring wraps twice
        x = torch.randn(b, n, h, d).to(torch.bfloat16)
        c, sn = _angles(n, d // 2)
        off = torch.tensor([rs + block * n])
        src.copy_(x)
        cos.copy_(c)
        sin.copy_(sn)
        offset.copy_(off)
        graph.replay()
        reference.rope_write_block(want_k, x, c, sn, off, rs, rz)
        reference.write_block(want_v, x, off, rs, rz)
        torch.cuda.synchronize()
        assert_close(cache_k.cpu(), want_k, **TOL[torch.bfloat16], what=f"graph replay K, block {block}")
        assert torch.equal(cache_v.cpu(), want_v), f"graph replay V, block {block}"


@pytest.mark.cuda
def test_cuda_ops_reject_host_offset(ext):
    cache = torch.zeros(1, 8, 2, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"`offset` must be on `cache`'s device cuda:0"):
        ext.write_block(cache, torch.zeros(1, 3, 2, 4, device="cuda"), torch.tensor([0]))

