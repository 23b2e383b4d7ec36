"""ONNX export of one contract variant, its checks, and a TensorRT-compatibility lint.

Export uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs nothing beyond torch and
onnx, and the graph it emits for these models is plain (MatMul/Softmax attention, ScatterElements cache
writes). Shapes are the contract's static shapes; no dynamic axes are declared, ever.

Checks after every export (``check_onnx``):
  * ``onnx.checker`` (by path, so graphs with external data past 2 GB are checked too);
  * graph inputs/outputs equal the contract (names, order, static shapes, dtypes);
  * ``lint_tensorrt``: ops outside TensorRT's ONNX parser support list, any dynamic or unknown dim
    after shape inference, any float64 tensor, int64 feeding anything but index/shape arithmetic
    (TensorRT computes int64 only in a few layers, and large int64 constants waste memory).
A failure raises ``OnnxLintError`` naming the node, its op type and the offending tensor.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from .contracts import Variant

__all__ = ["OPSETS", "OnnxLintError", "LintIssue", "export_onnx", "check_onnx", "lint_tensorrt",
           "TRT_SUPPORTED_OPS", "OrtRunner", "EXTERNAL_DATA_THRESHOLD"]

OPSETS = (18, 19, 20)
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom for the graph

# Operators the TensorRT 10 ONNX parser imports (onnx-tensorrt docs/operators.md, opsets 9-20), restricted
# to the deterministic, non-sequence, non-string ones a diffusion/VAE/vocoder/T5 graph can contain. An
# allowlist: anything new fails the lint until someone checks it against the parser.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mod Mul Neg Not OneHot Or Pad PRelu Pow
QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Selu Shape Sigmoid
Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())

# ops where int64 is index or shape arithmetic (cheap, supported); int64 into anything else is flagged
_INT64_OK = frozenset("""
Gather GatherElements GatherND ScatterElements ScatterND Slice Reshape Expand Tile Range Unsqueeze Squeeze
Concat Shape Size ConstantOfShape Cast Add Sub Mul Div Mod Equal Less LessOrEqual Greater GreaterOrEqual Where
Min Max Neg Abs Identity Flatten Transpose Split Constant Pad Resize TopK OneHot CumSum Sign Not
""".split())
_INT64_MAX_CONST = 1 << 16  # elements: larger int64 initializers are flagged (memory, host copies)


class OnnxLintError(RuntimeError):
    """An ONNX graph that TensorRT would reject or run badly; the message names each offending node."""


@dataclass(frozen=True)
class LintIssue:
    node: str
    op: str
    what: str

    def __str__(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.what}"


def export_onnx(module: torch.nn.Module, variant: Variant, path: str | os.PathLike, *, opset: int = 18,
                functional_outputs: bool = True, inputs: list[torch.Tensor] | None = None,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Trace ``module`` with the variant's sample inputs and write ``path`` (+ ``path.data`` if large)."""
    import onnx

    if opset not in OPSETS:
        raise ValueError(f"opset {opset}: use one of {OPSETS} (TensorRT 10 parses up to 20)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(inputs if inputs is not None else variant.sample_inputs())
    outs = variant.outputs if functional_outputs else variant.inplace_outputs
    tmp = path.with_suffix(".tmp.onnx")
    _register_symbolics(opset)
    with torch.no_grad():
        # torch.export first: every size becomes a Python int, so the TorchScript exporter below sees
        # static kernels (it cannot export a conv whose weight shape it traced as data) and no dynamic dim
        gm = torch.export.export(module, args, strict=False).module()
        gm.train = types.MethodType(lambda self, mode=True: self, gm)  # exporters call .eval(); gm refuses
        torch.onnx.export(gm, args, str(tmp), dynamo=False, opset_version=opset, input_names=variant.input_names,
                          output_names=[s.name for s in outs], do_constant_folding=True, dynamic_axes=None)
    model = onnx.load(str(tmp), load_external_data=True)
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    fold_static_shapes(model)
    _set_io_shapes(model, variant.inputs, outs)
    big = sum(t.ByteSize() for t in model.graph.initializer) > external_threshold
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    # one external data file next to the graph (the exporter would write one file per tensor)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return path


_FOLDABLE = frozenset("""
Shape Gather Slice Concat Unsqueeze Squeeze Cast Reshape Add Sub Mul Div Mod Neg Equal Less Greater Where Range
ConstantOfShape Expand Identity ReduceProd ReduceSum Floor Ceil Sqrt Min Max Abs Not ScatterElements ScatterND
Tile Transpose Split GatherElements Size Sign Pow Clip Log Exp Less LessOrEqual GreaterOrEqual And Or
""".split())
_FOLD_MAX = 1 << 20  # elements: only small (shape/index) tensors are folded, weights are left alone


def fold_static_shapes(model, max_rounds: int = 50) -> int:
    """Fold the shape arithmetic the TorchScript exporter leaves in (Shape -> Gather/Slice -> Concat ->
    Reshape) into constants, in place; returns the number of nodes folded.

    Every input shape is static, so each ``Shape`` is a constant once shape inference reaches it, and so
    is everything computed only from constants. Without this, ONNX shape inference (and the lint) sees
    unknown dims after every Reshape. Works on any dtype (onnxruntime cannot fold bf16 graphs on CPU).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    consts: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if _numel(t.dims) <= _FOLD_MAX and not t.external_data:
            consts[t.name] = numpy_helper.to_array(t)
    folded = 0
    for _ in range(max_rounds):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        static = {}
        for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            d = _dims(v)
            if v.type.tensor_type.HasField("shape") and all(isinstance(x, int) for x in d):
                static[v.name] = d
        nodes, changed = [], 0
        for n in g.node:
            vals = None
            if n.op_type == "Constant":
                t = next((a.t for a in n.attribute if a.name == "value"), None)
                if t is not None and _numel(t.dims) <= _FOLD_MAX:
                    consts[n.output[0]] = numpy_helper.to_array(t)
            elif n.op_type == "Shape" and n.input[0] in static:
                shp = np.array(static[n.input[0]], dtype=np.int64)
                at = {a.name: a.i for a in n.attribute}
                vals = [shp[at.get("start", 0):at.get("end", len(shp))]]
            elif n.op_type in _FOLDABLE and all(i in consts for i in n.input if i):
                try:
                    vals = ReferenceEvaluator(n).run(None, {i: consts[i] for i in n.input if i})
                except Exception:  # an op the reference evaluator cannot run: leave it to TensorRT
                    vals = None
                if vals is not None and any(np.asarray(v).size > _FOLD_MAX for v in vals):
                    vals = None
            if vals is None:
                nodes.append(n)
                continue
            for o, v in zip(n.output, vals):
                v = np.asarray(v)
                consts[o] = v
                nodes.append(helper.make_node("Constant", [], [o], value=numpy_helper.from_array(v, o),
                                              name=(n.name or o) + "_folded"))
            changed += 1
        del g.node[:]
        g.node.extend(_live(nodes, [o.name for o in g.output]))
        folded += changed
        if not changed:
            break
    keep = {i for n in g.node for i in n.input}
    live_inits = [t for t in g.initializer if t.name in keep]
    del g.initializer[:]
    g.initializer.extend(live_inits)
    del g.value_info[:]
    return folded


def _set_io_shapes(model, inputs, outputs) -> None:
    """Declare the contract's static shapes on the graph I/O (the exporter names traced dims)."""
    import onnx

    # the exporter drops inputs a variant never reads (the VAE's first frame reads no history); keep them
    # as declared, unused inputs so every variant of a contract binds the same names
    have = {v.name: v for v in model.graph.input}
    elem = {s.name: onnx.helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=s.torch_dtype).numpy().dtype)
            if s.dtype != "bfloat16" else onnx.TensorProto.BFLOAT16 for s in inputs}
    ordered = [have.get(s.name) or onnx.helper.make_tensor_value_info(s.name, elem[s.name], list(s.shape))
               for s in inputs]
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    for vals, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        for v, s in zip(vals, specs):
            shape = v.type.tensor_type.shape
            del shape.dim[:]
            for d in s.shape:
                shape.dim.add().dim_value = d
    onnx.shape_inference.infer_shapes(model, strict_mode=True)  # raises if the graph disagrees


def _live(nodes, outputs) -> list:
    """Dead-node elimination: keep nodes that some graph output depends on (order preserved)."""
    need, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    return keep[::-1]


def _nearest_exact(g, x, output_size, *scales):
    """aten::_upsample_nearest_exact{2,3}d -> Resize(nearest, asymmetric, floor).

    nearest-exact reads source index floor((i + 0.5) / s); for the integer upscale factors the VAE uses
    that equals floor(i / s), which is what asymmetric + floor computes (TensorRT supports both modes).
    """
    from torch.onnx import symbolic_helper as sh

    size = sh._maybe_get_const(output_size, "is")
    in_sizes = sh._get_tensor_sizes(x)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    if isinstance(size, (list, tuple)) and in_sizes and all(isinstance(d, int) for d in in_sizes):
        full = list(in_sizes[:2]) + list(size)
        factors = [o / i for o, i in zip(full, in_sizes)]
        sizes = g.op("Constant", value_t=torch.tensor(full, dtype=torch.int64))
        args = (empty, empty, sizes)
    else:  # the .vec overload: per-dim scale factors, static by construction
        factors = [1.0, 1.0] + list(sh._maybe_get_const(scales[-1], "fs"))
        args = (empty, g.op("Constant", value_t=torch.tensor(factors, dtype=torch.float32)))
    if any(f != int(f) or f < 1 for f in factors):
        raise RuntimeError(f"nearest-exact with factors {factors}: only integer upscaling maps onto ONNX Resize")
    return g.op("Resize", x, *args, mode_s="nearest", coordinate_transformation_mode_s="asymmetric",
                nearest_mode_s="floor")


def _register_symbolics(opset: int) -> None:
    from torch.onnx import register_custom_op_symbolic

    for name in ("aten::_upsample_nearest_exact2d", "aten::_upsample_nearest_exact3d"):
        register_custom_op_symbolic(name, _nearest_exact, opset)


def _dtype_name(elem_type: int) -> str:
    import onnx

    np_dt = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32", "float64": "float64",
            "bool": "bool"}.get(str(np_dt), "bfloat16" if elem_type == onnx.TensorProto.BFLOAT16 else str(np_dt))


def _dims(t) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.type.tensor_type.shape.dim]


def check_onnx(path: str | os.PathLike, variant: Variant, *, functional_outputs: bool = True) -> None:
    """onnx.checker + contract I/O + ``lint_tensorrt``; raises OnnxLintError / onnx's ValidationError."""
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    want_out = variant.outputs if functional_outputs else variant.inplace_outputs
    for kind, got, want in (("input", model.graph.input, variant.inputs), ("output", model.graph.output, want_out)):
        got_l = [(g.name, _dims(g), _dtype_name(g.type.tensor_type.elem_type)) for g in got]
        want_l = [(s.name, list(s.shape), s.dtype) for s in want]
        if got_l != want_l:
            diff = [f"{g} != contract {w}" for g, w in zip(got_l, want_l) if g != w] or [
                f"{len(got_l)} {kind}s, contract has {len(want_l)}"]
            raise OnnxLintError(f"{path}: graph {kind}s differ from the {variant.name} contract: " + "; ".join(diff))
    issues = lint_tensorrt(model)
    if issues:
        shown = "\n  ".join(str(i) for i in issues[:20])
        more = f"\n  ... and {len(issues) - 20} more" if len(issues) > 20 else ""
        raise OnnxLintError(f"{path}: {len(issues)} TensorRT-compatibility issue(s):\n  {shown}{more}")


def lint_tensorrt(model) -> list[LintIssue]:
    """Every TensorRT-compatibility problem of an in-memory ModelProto (see the module docstring)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    g = inferred.graph
    double, int64 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    info = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    issues: list[LintIssue] = []
    for v in list(g.input) + list(g.output):
        if any(not isinstance(d, int) or d <= 0 for d in _dims(v)):
            issues.append(LintIssue(v.name, "graph I/O", f"dynamic shape {_dims(v)}"))
        if v.type.tensor_type.elem_type == double:
            issues.append(LintIssue(v.name, "graph I/O", "float64"))
    for t in g.initializer:
        if t.data_type == double:
            issues.append(LintIssue(t.name, "initializer", "float64 initializer"))
        if t.data_type == int64 and _numel(t.dims) > _INT64_MAX_CONST:
            issues.append(LintIssue(t.name, "initializer", f"int64 initializer of {_numel(t.dims)} elements"))
    for n in g.node:
        name = n.name or (n.output[0] if n.output else "?")
        if n.domain not in ("", "ai.onnx"):
            issues.append(LintIssue(name, n.op_type, f"custom domain {n.domain!r} (no TensorRT importer)"))
        elif n.op_type not in TRT_SUPPORTED_OPS:
            issues.append(LintIssue(name, n.op_type, "operator outside TensorRT's ONNX support list"))
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == double:
                issues.append(LintIssue(name, n.op_type, "casts to float64"))
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == double:
                issues.append(LintIssue(name, n.op_type, "float64 constant"))
        for o in n.output:
            v = info.get(o)
            if v is None or not v.type.tensor_type.HasField("shape"):
                if n.op_type != "Constant":
                    issues.append(LintIssue(name, n.op_type, f"output {o!r} has no inferable static shape"))
                continue
            dims = _dims(v)
            if any(not isinstance(d, int) for d in dims):
                issues.append(LintIssue(name, n.op_type, f"output {o!r} has a dynamic/unknown shape {dims}"))
            if v.type.tensor_type.elem_type == double:
                issues.append(LintIssue(name, n.op_type, f"output {o!r} is float64"))
        if n.op_type not in _INT64_OK:
            for k, i in enumerate(n.input):
                v = info.get(i)
                src = producer.get(i)
                # a constant int64 operand after the data input is a parameter (axes, pads, shape): fine
                if k > 0 and (i in inits or (src is not None and src.op_type == "Constant")):
                    continue
                if v is not None and v.type.tensor_type.elem_type == int64:
                    issues.append(LintIssue(name, n.op_type, f"computes on int64 input {i!r}"
                                            + (f" (from {src.op_type})" if src is not None else "")))
    return issues


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


class OrtRunner:
    """One onnxruntime session per graph, fed and read by contract names (CPU, for checks and tests)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: _to_numpy(t) for n, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


def _to_numpy(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        raise TypeError("onnxruntime's CPU provider has no bfloat16 kernels for these graphs; check in float32")
    return t.numpy()


