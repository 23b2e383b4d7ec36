"""Stage ranges proven with a real NVTX tool: a small injection library (tests/nvtx_inject/), built here with
the system C compiler and loaded through NVTX's NVTX_INJECTION64_PATH, records every push and pop of the
process, and the recorded tree (names, nesting, categories, payloads) must be the one a stream of BLOCKS
blocks of STEPS steps is specified to emit; also the torch.cuda.nvtx client, the stage timer, and a
``stage()`` that costs nothing when off."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import timeit
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from hallolive_rt import nvtx as hn

REPO = Path(__file__).resolve().parents[1]
BLOCKS, STEPS = 2, 4
DECODE = ("vae/video", "vae/audio", "dit/context", "io/write")  # after a block's steps, in this order


def expected_tree(blocks: int = BLOCKS, steps: int = STEPS) -> list[tuple]:
    """The ranges of one stream on the loop's thread: ``(name, category, payload or None, children)``."""
    def block(b):
        kids = [("dit/step", "dit", b * 1000 + k, []) for k in range(steps)]
        return ("block", "block", b * 1000, kids + [(n, n.split("/")[0], b * 1000, []) for n in DECODE])
    return [("text/encode", "text", None, []), ("session", "session", None, [block(b) for b in range(blocks)])]


EXPECTED_TREE = expected_tree()


def synthetic_stream(blocks: int = BLOCKS, steps: int = STEPS) -> None:
    """A stand-in for the streaming loop with exactly its stages (tiny tensor work inside)."""
    stage, x = hn.stage, torch.ones(4, 4)
    with stage("text/encode"):
        ctx = x @ x
    with stage("session"):
        for b in range(blocks):
            with stage("block", block=b):
                for k in range(steps):
                    with stage("dit/step", block=b, step=k):
                        y = torch.tanh(ctx @ x)
                for name in DECODE:
                    with stage(name, block=b):
                        ctx = ctx + 0.5 * y


def _names(tree) -> list[str]:
    return [n for node in tree for n in [node[0], *_names(node[3])]]


def test_ranges_table_is_the_specified_tree_and_names_every_stage_in_use():
    def walk(nodes, parent):
        for name, _, payload, kids in nodes:
            fields = () if payload is None else ("block", "step") if name == "dit/step" else ("block",)
            assert hn.RANGES[name] == (parent, fields), name
            walk(kids, name)

    walk(EXPECTED_TREE, None)
    assert list(hn.RANGES) == list(dict.fromkeys(_names(EXPECTED_TREE)))
    used = {m for p in [*REPO.glob("runtime/**/*.py"), *REPO.glob("hallolive_rt/**/*.py")]
            for m in re.findall(r'\bstage\("([^"]+)"', p.read_text())}
    assert used and used <= set(hn.RANGES), used - set(hn.RANGES)
    assert hn.encode_payload(3, 2) == 3002 and hn.encode_payload(3) == 3000
    with pytest.raises(ValueError):
        hn.encode_payload(1, 1000)


# ---- under a real NVTX tool ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def inject_lib(tmp_path_factory) -> Path:
    if hn.describe()["backend"] != "nvtx":
        pytest.skip(f"the `nvtx` package is missing ({hn.describe()['backend']} client): no domain to record")
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no system C compiler `cc` to build the NVTX injection library")
    lib = tmp_path_factory.mktemp("nvtx_inject") / "librecord_ranges.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(lib),
                    str(REPO / "tests" / "nvtx_inject" / "record_ranges.c"), "-lpthread"], check=True)
    return lib


def parse_records(path: Path, domain: str = hn.DOMAIN) -> tuple[list[tuple], dict[int, str]]:
    """Recorded events -> (the range forest of ``domain``, {category id: name}); each thread keeps its own
    NVTX stack, and roots are listed in order of first push."""
    categories: dict[int, str] = {}
    stacks: dict[str, list[list]] = {}
    roots: list[list] = []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        if len(f) < 2 or f[1] != domain:
            continue
        if f[0] == "category":
            categories[int(f[2])] = f[3]
        elif f[0] == "push":
            _, _, tid, name, cat, ptype, pval = f
            assert ptype in ("none", "i64"), f"unexpected payload type {ptype} on {name}"
            node = [name, int(cat), None if ptype == "none" else int(pval), []]
            stack = stacks.setdefault(tid, [])
            (stack[-1][3] if stack else roots).append(node)
            stack.append(node)
        elif f[0] == "pop":
            assert stacks.get(f[2]), f"pop without a push on thread {f[2]}"
            stacks[f[2]].pop()
    assert not any(stacks.values()), f"ranges never popped: {stacks}"

    def freeze(n):
        return (n[0], categories.get(n[1], f"<unnamed {n[1]}>"), n[2], [freeze(c) for c in n[3]])

    return [freeze(r) for r in roots], categories


def record_ranges(program: str | list[str], lib: Path, tmp_path: Path, env: dict | None = None):
    """Run ``program`` (Python source, or an argv) with the tool attached; ``parse_records`` of what it saw."""
    rec = tmp_path / "nvtx_events.tsv"
    argv = [sys.executable, "-c", program] if isinstance(program, str) else list(program)
    full_env = {k: v for k, v in os.environ.items() if k != "HALLOLIVE_NVTX"}
    full_env.update(NVTX_INJECTION64_PATH=str(lib), HALLOLIVE_NVTX_RECORD=str(rec),
                    OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(argv, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rec.is_file() and rec.read_text().startswith("init"), "the NVTX tool was not loaded"
    return parse_records(rec)


def _stream_argv(tmp_path, *extra):
    return [sys.executable, "-m", "hallolive_rt.cli", "stream", "--preset", "tiny", "--blocks", str(BLOCKS),
            "--out", str(tmp_path / "s.mp4"), "--kv-impl", "torch", *extra]


def test_real_tiny_stream_emits_the_tree(inject_lib, tmp_path):
    """`hallolive-rt stream` itself (2 tiny blocks, decode on the loop's thread) under an NVTX tool."""
    tree, categories = record_ranges(_stream_argv(tmp_path, "--no-overlap"), inject_lib, tmp_path)
    assert sorted(categories.values()) == sorted(["session", "text", "block", "dit", "vae", "io"])
    assert tree == EXPECTED_TREE, f"recorded {tree}\nexpected {EXPECTED_TREE}"


def test_real_stream_with_overlap_keeps_decode_ranges_on_their_threads(inject_lib, tmp_path):
    """With overlap the decoders and the writer run on their own threads: their ranges are roots there (NVTX
    nests per thread) with the same names and block payloads; the loop's tree keeps the rest."""
    tree, _ = record_ranges(_stream_argv(tmp_path), inject_lib, tmp_path)
    off_loop = {"vae/video", "vae/audio", "io/write"}

    def prune(nodes):
        return [(n, c, p, prune(k)) for n, c, p, k in nodes if n not in off_loop]

    assert [n for n in tree if n[0] not in off_loop] == prune(EXPECTED_TREE)
    others = sorted((n[0], n[2]) for n in tree if n[0] in off_loop)
    assert others == sorted((name, b * 1000) for b in range(BLOCKS) for name in off_loop)
    assert all(not n[3] for n in tree if n[0] in off_loop)


def test_synthetic_stream_under_the_tool_and_warmup_under_suppressed_is_invisible(inject_lib, tmp_path):
    # What the nsys capture range relies on: the first `session` the tool sees is the profiled one.
    program = ("from hallolive_rt.nvtx import suppressed\nfrom tests.test_nvtx import synthetic_stream\n"
               "with suppressed():\n    synthetic_stream()\nsynthetic_stream()\n")
    tree, categories = record_ranges(program, inject_lib, tmp_path)
    assert sorted(categories.values()) == sorted(["session", "text", "block", "dit", "vae", "io"])
    assert tree == EXPECTED_TREE


def test_env_switch_silences_ranges_under_a_tool(inject_lib, tmp_path):
    program = "from tests.test_nvtx import synthetic_stream; synthetic_stream(1, 1)"
    assert record_ranges(program, inject_lib, tmp_path, env={"HALLOLIVE_NVTX": "0"})[0] == []


# ---- without the `nvtx` package -----------------------------------------------------------------

def _run_without_nvtx_package(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter where ``import nvtx`` fails; the JSON of its last line."""
    prog = "import sys\nsys.modules['nvtx'] = None\n" + code
    full_env = {k: v for k, v in os.environ.items() if k not in ("HALLOLIVE_NVTX", "NVTX_INJECTION64_PATH")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", prog], env=full_env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_the_package_the_runtime_imports_and_timing_works():
    info = _run_without_nvtx_package(
        "import json, torch\nfrom hallolive_rt import nvtx as hn\n"
        "import hallolive_rt.runtime.session, hallolive_rt.runtime.decode_pipeline, hallolive_rt.runtime.bench\n"
        "from tests.test_nvtx import synthetic_stream\n"
        "with hn.StageTimer() as timer:\n    synthetic_stream()\n"
        "print(json.dumps({**hn.describe(), 'stages': [r.name for r in timer.records()],\n"
        "                  'cuda_torch': hasattr(torch._C, '_nvtx')}))\n")
    assert info["backend"] == ("torch.cuda.nvtx" if info["cuda_torch"] else "none")
    assert info["enabled"] is False and info["domain"] is None
    assert info["stages"] == _names(EXPECTED_TREE)


def test_torch_nvtx_client_pushes_the_bare_stage_names_under_a_tool():
    """With a tool named in NVTX_INJECTION64_PATH, torch.cuda.nvtx pushes/pops each stage by its bare name;
    torch's NVTX entry points are replaced by a recorder here."""
    info = _run_without_nvtx_package(
        "import json, torch, torch.cuda.nvtx as tn\ncalls = []\n"
        "class Rec:\n"
        "    def rangePushA(self, msg): calls.append(('push', msg)); return 0\n"
        "    def rangePop(self): calls.append(('pop', None)); return 0\n"
        "torch._C._nvtx = tn._nvtx = Rec()\n"
        "from hallolive_rt import nvtx as hn\nfrom tests.test_nvtx import synthetic_stream\n"
        "synthetic_stream()\nprint(json.dumps({**hn.describe(), 'calls': calls}))\n",
        env={"NVTX_INJECTION64_PATH": "/nonexistent/libtool.so"})
    assert info["backend"] == "torch.cuda.nvtx" and info["tool_attached"] and info["enabled"]
    pushes = [m for op, m in info["calls"] if op == "push"]
    assert pushes == _names(EXPECTED_TREE)
    assert sum(op == "pop" for op, _ in info["calls"]) == len(pushes)


# ---- off, refused, timed ------------------------------------------------------------------------

def test_stage_is_free_when_off():
    if hn.describe()["enabled"]:
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
    assert t_stage < 2e-6 and t_stage - t_null < 1e-6, f"stage() {t_stage * 1e9:.0f} ns, null {t_null * 1e9:.0f} ns"


def test_unknown_or_mismatched_stage_is_refused_when_on():
    with hn.StageTimer():
        with pytest.raises(KeyError, match="not in hallolive_rt.nvtx.RANGES"):
            hn.stage("dit/stepp", block=0, step=0)
        with pytest.raises(ValueError, match="takes block, step"):
            hn.stage("dit/step", block=0)
        with pytest.raises(ValueError, match="takes no block/step"):
            hn.stage("session", block=0)


def test_stage_timer_times_every_stage_on_cpu():
    with hn.StageTimer("cpu") as timer:
        synthetic_stream()
        with hn.stage("io/write", block=9):
            time.sleep(0.02)
    with hn.stage("session"):  # not timed: the timer is uninstalled
        pass
    recs = timer.records()
    assert [r.name for r in recs] == _names(EXPECTED_TREE) + ["io/write"]
    assert [(r.block, r.step) for r in recs if r.name == "dit/step"] == [(b, k) for b in range(BLOCKS)
                                                                          for k in range(STEPS)]
    assert recs[-1].block == 9 and 20 <= recs[-1].ms < 2000, recs[-1]
    session = next(r.ms for r in recs if r.name == "session")
    assert session >= sum(r.ms for r in recs if r.name == "block") > 0  # a parent outlasts its children
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
            with hn.stage("dit/step", block=0, step=1):  # inside capture: not timed
                y = x @ x
    recs = timer.records()
    assert [(r.name, r.step) for r in recs] == [("dit/step", 0)] and recs[0].ms > 0
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
