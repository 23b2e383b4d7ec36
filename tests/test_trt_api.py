"""Every TensorRT name our code uses exists in the TensorRT 11.x Python bindings. The uses are read from our
sources with ``ast`` (``trt.X.Y`` chains, and methods and keyword arguments on the objects TensorRT hands
back, typed by the call that made them), so the list follows the code. The bindings come from the
``tensorrt-cu13-bindings`` wheel (about 1.3 MB; fetched with pip, or named by HALLOLIVE_TRT_WHEEL), which
cannot load without TensorRT's libraries: stand-in libraries with the few C entry points it links against
let it import on any Linux machine, and no TensorRT call is made. Skipped without pip access or a C compiler."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*REPO.glob("export/trt*.py"), REPO / "runtime" / "backends" / "tensorrt.py"])
WHEEL_REQ = "tensorrt-cu13-bindings>=11,<12"

# The TensorRT class of each object our code keeps in a variable (by its name there), and of what each
# factory call returns; an assignment that breaks this naming fails the test instead of escaping it.
VARIABLES = {"logger": "Logger", "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
             "config": "IBuilderConfig", "cache": "ITimingCache", "runtime": "Runtime", "engine": "ICudaEngine",
             "ctx": "IExecutionContext"}
FACTORIES = {"Logger": "Logger", "Builder": "Builder", "OnnxParser": "OnnxParser", "Runtime": "Runtime",
             "create_network": "INetworkDefinition", "create_builder_config": "IBuilderConfig",
             "create_timing_cache": "ITimingCache", "get_timing_cache": "ITimingCache",
             "deserialize_cuda_engine": "ICudaEngine", "create_execution_context": "IExecutionContext"}
# The C entry points of libnvinfer / libnvonnxparser / libnvinfer_plugin that the bindings link against
# (everything else goes through their C++ interfaces); a newer wheel naming another is added on the fly.
C_ENTRY_POINTS = ["createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL", "createInferRuntime_INTERNAL",
                  "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getBuilderPluginRegistry",
                  "getNvOnnxParserVersion", "getPluginRegistry", "initLibNvInferPlugins"]


def _chain(node: ast.AST) -> list[str] | None:
    """``trt.A.B`` -> ["A", "B"]; a method on a typed object -> [its class, method]; else None."""
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "trt":
            return [node.attr]
        inner = _chain(node.value)
        if inner is not None:
            return inner + [node.attr]
        cls = _type_of(node.value)
        return None if cls is None else [cls, node.attr]
    return None


def _type_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return VARIABLES.get(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _chain(node.func) is not None:
        return FACTORIES.get(node.func.attr)
    return None


def used_names() -> dict[str, list[str]]:
    """{"A.B": keyword arguments passed to it} for every TensorRT name in SOURCES."""
    uses: dict[str, set[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and (chain := _chain(node)) is not None:
                uses.setdefault(".".join(chain), set())
            if isinstance(node, ast.Call) and (chain := _chain(node.func)) is not None:
                uses.setdefault(".".join(chain), set()).update(k.arg for k in node.keywords if k.arg)
            if isinstance(node, ast.Assign) and (cls := _type_of(node.value)) is not None:
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                assert names and all(VARIABLES.get(n) == cls for n in names), \
                    f"{path.name}:{node.lineno}: a TensorRT {cls} kept as {names}: name it as in VARIABLES"
    return {k: sorted(v) for k, v in uses.items()}


def test_the_collector_sees_our_uses():
    uses = used_names()
    for expected in ("NetworkDefinitionCreationFlag.STRONGLY_TYPED", "IBuilderConfig.set_memory_pool_limit",
                     "ITimingCache.serialize", "IExecutionContext.execute_async_v3", "OnnxParser.num_errors"):
        assert expected in uses, sorted(uses)
    assert uses["IBuilderConfig.set_timing_cache"] == ["ignore_mismatch"]
    assert not [u for u in uses if u.startswith("BuilderFlag.")], "TensorRT 11 has no precision builder flags"


# ---- the 11.x bindings --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bindings(tmp_path_factory) -> Path:
    """A folder holding the wheel's ``tensorrt_bindings`` package and stand-in TensorRT libraries."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler `cc` for the stand-in TensorRT libraries")
    root = tmp_path_factory.mktemp("trt_bindings")
    wheel = os.environ.get("HALLOLIVE_TRT_WHEEL")
    if not wheel:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "-q", "-d", str(root), WHEEL_REQ], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"fetching {WHEEL_REQ} took over 300 s")
        wheels = sorted(root.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"could not fetch {WHEEL_REQ}: {proc.stderr.strip()[-300:]}")
        wheel = wheels[0]
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root)
    return root


def _stand_in_libraries(folder: Path, symbols: list[str]) -> None:
    src = folder / "stub.c"
    src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
    for lib in ("nvinfer", "nvonnxparser", "nvinfer_plugin"):
        for major in (10, 11, 12):
            name = f"lib{lib}.so.{major}"
            subprocess.run(["cc", "-shared", "-fPIC", "-o", str(folder / name), f"-Wl,-soname,{name}", str(src)],
                           check=True)


CHECK = """
import json, sys
import tensorrt_bindings as trt
found = {}
for name, keywords in json.loads(sys.argv[1]).items():
    obj = trt
    for part in name.split("."):
        obj = getattr(obj, part, None)
    doc = getattr(obj, "__doc__", None) or ""  # pybind11 signatures: "name(self: ..., keyword: type, ...)"
    found[name] = None if obj is None else [k for k in keywords if f"{k}:" not in doc]
print(json.dumps({"version": trt.__version__, "found": found}))
"""


def test_every_tensorrt_name_we_use_exists_in_the_11x_bindings(bindings, tmp_path):
    uses = used_names()
    symbols = list(C_ENTRY_POINTS)
    env = {**os.environ, "PYTHONPATH": str(bindings), "LD_LIBRARY_PATH": str(tmp_path)}
    for _ in range(20):
        _stand_in_libraries(tmp_path, symbols)
        proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(uses)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        missing = re.search(r"undefined symbol: (\w+)", proc.stderr)
        if proc.returncode == 0 or missing is None:
            break
        symbols.append(missing.group(1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 11.x unless HALLOLIVE_TRT_WHEEL names another wheel (a 10.x one checks the older API we keep)
    assert out["version"].startswith("11.") or os.environ.get("HALLOLIVE_TRT_WHEEL"), out["version"]
    absent = sorted(n for n, kw in out["found"].items() if kw is None)
    bad_keywords = {n: kw for n, kw in out["found"].items() if kw}
    assert not absent, f"not in TensorRT {out['version']}: {absent}"
    assert not bad_keywords, f"keyword arguments TensorRT {out['version']} does not take: {bad_keywords}"
    print(f"TensorRT {out['version']}: all {len(uses)} names found")
