"""TensorRT plans from the exported ONNX graphs with the TensorRT Python API, for TensorRT 11 (and 10):
a strongly typed network whose precision is already in the graph (no precision builder flags; fp8 needs
the exporter's Q/DQ nodes), and a timing cache beside the plans reused by every build. Without TensorRT
every entry point raises ``TensorRTMissing`` with the install command. Not verified: no plan has been built
with this code; ``tests/test_trt_api.py`` checks every TensorRT name it uses against the 11.x bindings."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REQUIREMENT", "TensorRTMissing", "require_tensorrt", "build_engine"]

REQUIREMENT = "tensorrt>=10,<12"  # the versions whose API this code uses (pyproject's tensorrt extra)


class TensorRTMissing(RuntimeError):
    """The ``tensorrt`` Python package is not importable."""


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTMissing(f"TensorRT is not installed: pip install '{REQUIREMENT}' (or the hallolive-rt[tensorrt] "
                              f"extra) on a machine with an NVIDIA GPU ({e})") from e
    if int(trt.__version__.split(".")[0]) not in (10, 11):
        raise TensorRTMissing(f"TensorRT {trt.__version__} is installed; this code is written for '{REQUIREMENT}'")
    return trt


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, precision: str, *,
                 timing_cache: str | os.PathLike | None = None, workspace_bytes: int | None = None) -> Path:
    """Parse ``onnx_path`` (external data next to it is found by the parser) and write a serialized plan."""
    trt = require_tensorrt()
    import onnx

    if precision == "fp8":
        ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
        if not {"QuantizeLinear", "DequantizeLinear"} & ops:
            raise ValueError(f"{onnx_path}: fp8 plans need an explicitly quantized graph (Q/DQ nodes); none found")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 types every network strongly (its STRONGLY_TYPED flag is deprecated and ignored); 10 needs the flag.
    strong = 0 if trt.__version__.startswith("11.") else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strong)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n  {errs}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    Path(plan_path).write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return Path(plan_path)
