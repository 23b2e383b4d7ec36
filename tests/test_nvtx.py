"""NVTX ranges proven with a real NVTX tool: a small injection library (tests/nvtx_inject/), built here
with the system C compiler and loaded through NVTX's documented NVTX_INJECTION64_PATH mechanism,
records every push/pop of the process; the recorded tree must equal the tree documented in
hallolive_rt/nvtx.py (names, nesting, categories, payloads). Also: free when off.

To prove the real stream instead of the synthetic loop, pass its argv to ``record_ranges``, e.g.
``record_ranges([sys.executable, "-m", "hallolive_rt.cli", "stream", "--preset", "tiny", "--blocks", "2"], lib, tmp)``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import timeit
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from hallolive_rt import nvtx as hn

REPO = Path(__file__).resolve().parents[1]
INJECT_SRC = REPO / "tests" / "nvtx_inject" / "record_ranges.c"
BLOCKS, STEPS = 2, 4
EXPECTED_TREE = hn.expected_tree(BLOCKS, STEPS)


def synthetic_stream(blocks: int = BLOCKS, steps: int = STEPS) -> None:
    """A stand-in for the streaming loop with exactly the documented stages (tiny tensor work inside)."""
    stage = hn.stage
    x = torch.ones(4, 4)
    with stage("text/encode"):
        ctx = x @ x
    with stage("session"):
        for b in range(blocks):
            with stage("block", block=b):
                for k in range(steps):
                    with stage("dit/step", block=b, step=k):
                        y = torch.tanh(ctx @ x)
                with stage("vae/video", block=b):
                    torch.nn.functional.conv2d(y[None, None], torch.ones(1, 1, 3, 3), padding=1)
                with stage("vae/audio", block=b):
                    torch.relu(y)
                with stage("dit/context", block=b):
                    ctx = ctx + 0.5 * y
                with stage("io/write", block=b):
                    y.sum()


# ---- the recording harness ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def inject_lib(tmp_path_factory) -> Path:
    if hn.describe()["backend"] != "nvtx":
        pytest.skip(f"the `nvtx` package is missing ({hn.describe()['backend']} client): no domain to record")
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no system C compiler `cc` to build the NVTX injection library")
    lib = tmp_path_factory.mktemp("nvtx_inject") / "librecord_ranges.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(lib),
                    str(INJECT_SRC), "-lpthread"], check=True, capture_output=True, text=True)
    return lib


def parse_records(path: Path, domain: str = hn.DOMAIN) -> tuple[list[tuple], dict[int, str]]:
    """Recorded events -> (roots of the range forest of ``domain``, {category id: name}).

    Nodes are ``(name, category name, payload or None, children)``, children in push order; threads
    are kept apart (each has its own NVTX stack) and their roots listed in order of first push."""
    categories: dict[int, str] = {}
    stacks: dict[str, list[list]] = {}
    roots: list[list] = []
    pushes: list[list] = []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        if f[0] == "category" and f[1] == domain:
            categories[int(f[2])] = f[3]
        elif f[0] == "push" and f[1] == domain:
            _, _, tid, name, cat, ptype, pval = f
            payload = None if ptype == "none" else int(pval)
            assert ptype in ("none", "i64"), f"unexpected payload type {ptype} on {name}"
            node = [name, int(cat), payload, []]
            pushes.append(node)
            stack = stacks.setdefault(tid, [])
            (stack[-1][3] if stack else roots).append(node)
            stack.append(node)
        elif f[0] == "pop" and f[1] == domain:
            assert stacks.get(f[2]), f"pop without a push on thread {f[2]}"
            stacks[f[2]].pop()
    open_ranges = {t: [n[0] for n in s] for t, s in stacks.items() if s}
    assert not open_ranges, f"ranges never popped: {open_ranges}"

    def freeze(n):
        return (n[0], categories.get(n[1], f"<unnamed {n[1]}>"), n[2], [freeze(c) for c in n[3]])

    return [freeze(r) for r in roots], categories


def record_ranges(program: str | list[str], lib: Path, tmp_path: Path, env: dict | None = None):
    """Run ``program`` (Python source, or a full argv) with the injection library attached and return
    ``parse_records`` of what it recorded."""
    rec = tmp_path / "nvtx_events.tsv"
    argv = [sys.executable, "-c", program] if isinstance(program, str) else list(program)
    full_env = {k: v for k, v in os.environ.items() if k != "HALLOLIVE_NVTX"}
    full_env.update(NVTX_INJECTION64_PATH=str(lib), HALLOLIVE_NVTX_RECORD=str(rec),
                    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(argv, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rec.is_file() and rec.read_text().startswith("init"), "the NVTX tool was not loaded"
    return parse_records(rec)


def _names(tree) -> list[str]:
    return [n for node in tree for n in [node[0], *_names(node[3])]]


# ---- the documented tree ------------------------------------------------------------------------

def test_documented_tree_has_the_required_stages():
    names = hn.range_names()
    for required in ("session", "block", "text/encode", "dit/step", "dit/context", "vae/video",
                     "vae/audio", "io/write"):
        assert required in names
    roots = hn.documented_tree()
    assert [r.name for r in roots] == ["text/encode", "session"]
    block = next(c for c in roots[1].children if c.name == "block")
    assert [c.name for c in block.children] == ["dit/step", "vae/video", "vae/audio", "dit/context", "io/write"]
    assert _names(EXPECTED_TREE).count("dit/step") == BLOCKS * STEPS
    assert _names(EXPECTED_TREE).count("block") == BLOCKS


def test_payload_encoding_roundtrips():
    for b in (0, 1, 7, 123):
        for s in (None, 0, 3, 999):
            assert hn.decode_payload(hn.encode_payload(b, s)) == (b, s or 0)
    assert hn.encode_payload(3, 2) == 3002
    with pytest.raises(ValueError):
        hn.encode_payload(1, 1000)


def _stream_argv(tmp_path, *extra):
    return [sys.executable, "-m", "hallolive_rt.cli", "stream", "--preset", "tiny", "--blocks", str(BLOCKS),
            "--out", str(tmp_path / "s.mp4"), "--kv-impl", "torch", *extra]


def test_real_tiny_stream_emits_the_documented_tree(inject_lib, tmp_path):
    """`hallolive-rt stream` itself (2 tiny blocks, decode on the loop's thread) under an NVTX tool."""
    tree, categories = record_ranges(_stream_argv(tmp_path, "--no-overlap"), inject_lib, tmp_path)
    assert sorted(categories.values()) == sorted(["session", "text", "block", "dit", "vae", "io"])
    if tree != EXPECTED_TREE:
        pytest.fail(f"recorded NVTX tree differs from the documented one:\nrecorded {tree}\nexpected {EXPECTED_TREE}")


def test_real_stream_with_overlap_keeps_decode_ranges_on_their_threads(inject_lib, tmp_path):
    """With overlap the decoders and the writer run on their own threads: their ranges become roots
    there (NVTX nests per thread) with the same names and block payloads; the loop's tree keeps the rest."""
    tree, _ = record_ranges(_stream_argv(tmp_path), inject_lib, tmp_path)
    off_loop = {"vae/video", "vae/audio", "io/write"}

    def prune(nodes):
        return [(n, c, p, prune(k)) for n, c, p, k in nodes if n not in off_loop]

    main = [n for n in tree if n[0] not in off_loop]
    assert main == prune(EXPECTED_TREE)
    others = sorted((n[0], n[2]) for n in tree if n[0] in off_loop)
    assert others == sorted((name, hn.encode_payload(b)) for b in range(BLOCKS) for name in off_loop)
    assert all(not n[3] for n in tree if n[0] in off_loop)


def test_injected_tool_records_the_documented_tree(inject_lib, tmp_path):
    program = f"from tests.test_nvtx import synthetic_stream; synthetic_stream({BLOCKS}, {STEPS})"
    tree, categories = record_ranges(program, inject_lib, tmp_path)
    assert sorted(categories.values()) == sorted(["session", "text", "block", "dit", "vae", "io"])
    if tree != EXPECTED_TREE:
        pytest.fail(f"recorded NVTX tree differs from the documented one:\nrecorded {tree}\nexpected {EXPECTED_TREE}")


def test_warmup_under_suppressed_is_invisible(inject_lib, tmp_path):
    # What the nsys capture range relies on: the first `session` the tool sees is the profiled one.
    program = ("from tests.test_nvtx import synthetic_stream\n"
               "from hallolive_rt.runtime.profiling import run_with_warmup\n"
               f"run_with_warmup(lambda: synthetic_stream({BLOCKS}, {STEPS}), 2)\n")
    tree, _ = record_ranges(program, inject_lib, tmp_path)
    assert tree == EXPECTED_TREE


def test_env_switch_silences_ranges_under_a_tool(inject_lib, tmp_path):
    program = "from tests.test_nvtx import synthetic_stream; synthetic_stream(1, 1)"
    tree, _ = record_ranges(program, inject_lib, tmp_path, env={"HALLOLIVE_NVTX": "0"})
    assert tree == []


# ---- without the `nvtx` package (the GPU image lacks it) ----------------------------------------

def _run_without_nvtx_package(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter where ``import nvtx`` fails; returns its stdout."""
    prog = "import sys\nsys.modules['nvtx'] = None\n" + code
    full_env = {k: v for k, v in os.environ.items() if k not in ("HALLOLIVE_NVTX", "NVTX_INJECTION64_PATH")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", prog], env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_without_the_package_ranges_fall_back_and_the_runtime_imports():
    out = _run_without_nvtx_package(
        "import json, torch\n"
        "from hallolive_rt import nvtx as hn\n"
        "import hallolive_rt.runtime.session, hallolive_rt.runtime.decode_pipeline, hallolive_rt.runtime.bench\n"
        "from tests.test_nvtx import synthetic_stream\n"
        "timer = hn.StageTimer()\n"
        "with timer:\n"
        "    synthetic_stream(2, 4)\n"
        "print(json.dumps({**hn.describe(), 'stages': [r.name for r in timer.records()],\n"
        "                  'cuda_torch': hasattr(torch._C, '_nvtx')}))\n")
    info = json.loads(out.strip().splitlines()[-1])
    assert info["backend"] == ("torch.cuda.nvtx" if info["cuda_torch"] else "none")
    assert "`nvtx` package is not installed" in info["fallback_reason"]
    assert info["categories"] is False and info["payloads"] is False and info["enabled"] is False
    assert info["stages"] == _names(EXPECTED_TREE), "timing works without any NVTX client"


def test_torch_nvtx_fallback_pushes_the_bare_stage_names_under_a_tool():
    """With a tool named in NVTX_INJECTION64_PATH, the torch.cuda.nvtx client pushes/pops each stage by
    its bare name (default domain); torch's NVTX entry points are replaced by a recorder here."""
    out = _run_without_nvtx_package(
        "import json, torch, torch.cuda.nvtx as tn\n"
        "calls = []\n"
        "class Rec:\n"
        "    def rangePushA(self, msg): calls.append(('push', msg)); return 0\n"
        "    def rangePop(self): calls.append(('pop', None)); return 0\n"
        "torch._C._nvtx = tn._nvtx = Rec()\n"
        "from hallolive_rt import nvtx as hn\n"
        "from tests.test_nvtx import synthetic_stream\n"
        "synthetic_stream(2, 4)\n"
        "print(json.dumps({**hn.describe(), 'calls': calls}))\n",
        env={"NVTX_INJECTION64_PATH": "/nonexistent/libtool.so"})
    info = json.loads(out.strip().splitlines()[-1])
    assert info["backend"] == "torch.cuda.nvtx" and info["tool_attached"] and info["enabled"]
    pushes = [m for op, m in info["calls"] if op == "push"]
    assert pushes == _names(EXPECTED_TREE)
    assert sum(op == "pop" for op, _ in info["calls"]) == len(pushes)


# ---- free when off ------------------------------------------------------------------------------

def test_stage_is_free_when_off():
    if hn.nvtx_enabled():
        pytest.skip("an NVTX tool is attached to the test process")
    assert hn.stage("dit/step", block=1, step=2) is hn._OFF

    def with_stage():
        with hn.stage("dit/step", block=1, step=2):
            pass

    ctx = nullcontext()

    def with_null():
        with ctx:
            pass

    n = 20000
    t_stage = min(timeit.repeat(with_stage, number=n, repeat=7)) / n
    t_null = min(timeit.repeat(with_null, number=n, repeat=7)) / n
    print(f"stage() off: {t_stage * 1e9:.0f} ns per enter/exit; nullcontext: {t_null * 1e9:.0f} ns")
    assert t_stage < 2e-6, f"stage() costs {t_stage * 1e9:.0f} ns when off"
    # relative to a bare context manager (robust on a loaded machine): under 1 us of extra work
    assert t_stage - t_null < 1e-6, f"stage() {t_stage * 1e9:.0f} ns vs nullcontext {t_null * 1e9:.0f} ns"


def test_undocumented_or_mismatched_stage_is_refused_when_on():
    with hn.StageTimer():
        with pytest.raises(KeyError, match="not in the documented range tree"):
            hn.stage("dit/stepp", block=0, step=0)
        with pytest.raises(ValueError, match="takes block, step"):
            hn.stage("dit/step", block=0)
        with pytest.raises(ValueError, match="takes no block/step"):
            hn.stage("session", block=0)


def test_stage_timer_times_every_stage_on_cpu():
    timer = hn.StageTimer("cpu")
    with timer:
        synthetic_stream(BLOCKS, STEPS)
    with hn.stage("session"):      # not timed: the timer is uninstalled
        pass
    recs = timer.records()
    assert [r.name for r in recs] == _names(EXPECTED_TREE)
    assert all(r.ms >= 0 for r in recs)
    stats = {s.name: s for s in timer.summary()}
    assert stats["dit/step"].count == BLOCKS * STEPS and stats["block"].count == BLOCKS
    # nesting: a parent lasts at least as long as the sum of its children
    assert stats["session"].total_ms >= stats["block"].total_ms
    with hn.suppressed(), timer:
        synthetic_stream(1, 1)
    assert len(timer.records()) == len(recs)


@pytest.mark.cuda
def test_stage_timer_uses_cuda_events_and_skips_graph_capture():
    timer = hn.StageTimer("cuda")
    x = torch.randn(256, 256, device="cuda")
    g = torch.cuda.CUDAGraph()
    with timer:
        with hn.stage("dit/step", block=0, step=0):
            y = x @ x
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            with hn.stage("dit/step", block=0, step=1):      # inside capture: not timed
                y = x @ x
    recs = timer.records()
    assert [(r.name, r.step) for r in recs] == [("dit/step", 0)] and recs[0].ms > 0
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
