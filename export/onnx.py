"""ONNX export of one contract variant, traced on the meta device (no weight value is touched: the
initializers point into the shared weights file, so the full-size DiT exports on a 24 GB machine),
cleaned by ``onnxscript``'s optimizer, with static shapes only; then ``check_onnx``: ``onnx.checker``, the
graph's I/O against the contract and ``lint_tensorrt`` (a failure raises ``OnnxLintError`` naming the node,
its op and the tensor). What is linted: ``docs/ARCHITECTURE.md``, "Export"."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .contracts import Variant
from .weights_file import WeightsLayout, on_meta

__all__ = ["OPSETS", "OnnxLintError", "LintIssue", "export_onnx", "check_onnx", "lint_tensorrt",
           "TRT_SUPPORTED_OPS", "OrtRunner", "FOLD_LIMIT"]

OPSETS = (18, 19, 20)
FOLD_LIMIT = 1 << 20  # elements: shape/index arithmetic up to this size is folded into constants

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


def export_onnx(module: torch.nn.Module, variant: Variant, path: str | os.PathLike, *, layout: WeightsLayout,
                weights_file: str | os.PathLike, names: dict[str, str], opset: int = 18,
                graph_pass: Callable | None = None) -> Path:
    """Trace ``module`` (the contract wrapper) on the meta device into ``path``, its initializers pointing into
    ``weights_file`` (same directory) by ``layout``; ``names``: wrapper tensor name -> layout name. ``graph_pass``
    (the fp8 rewrite) runs on the onnx_ir model before ``_optimize`` and must type each initializer as its bytes
    (a layout slot stored unlike traced, float8, needs it). The file appears under its name only when complete."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import from_torch_dtype

    if opset not in OPSETS:
        raise ValueError(f"opset {opset}: use one of {OPSETS} (TensorRT 10 parses up to 20)")
    path, weights_file = Path(path), Path(weights_file)
    if weights_file.parent.resolve() != path.parent.resolve():
        raise ValueError(f"{weights_file} must sit next to {path}: external data is found relative to the graph")
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.empty(s.shape, dtype=s.torch_dtype, device="meta") for s in variant.inputs)
    with on_meta(module), torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        model = torch.onnx.export(ep, dynamo=True, opset_version=opset, input_names=variant.input_names,
                                  output_names=variant.output_names, optimize=False, verify=False, report=False).model
    for name, init in model.graph.initializers.items():
        slot = layout.slots.get(names.get(name, ""))
        if slot is None:
            raise RuntimeError(f"{path.name}: the exported graph holds a tensor {name!r} that is not a parameter "
                               "or buffer of the model (a constant created in forward?); register it as a buffer")
        if tuple(init.shape.dims) != slot.shape:
            raise RuntimeError(f"{path.name}: {name!r} is {tuple(init.shape.dims)} in the graph, {slot.shape} in the layout")
        init.const_value = ir.ExternalTensor(weights_file.name, slot.offset, slot.nbytes,
                                             from_torch_dtype(slot.dtype),  # float8 where the layout says so
                                             shape=init.shape, name=name, base_dir=str(path.parent))
    if graph_pass is not None:
        graph_pass(model)
    retyped = [n for n, v in model.graph.initializers.items()
               if v.const_value is not None and v.dtype != v.const_value.dtype]
    if retyped:
        raise RuntimeError(f"{path.name}: {len(retyped)} initializer(s) typed unlike their stored bytes, e.g. "
                           f"{retyped[:3]} (a layout dtype other than the traced one needs a graph pass)")
    _optimize(model)
    proto = ir.serde.serialize_model(model)
    tmp = path.with_name(path.name + ".partial")
    try:
        import onnx

        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _optimize(model) -> None:
    """``onnxscript``'s default optimizer without its pattern rewriter, which is quadratic in the graph size (it
    did not finish one full-size DiT variant in 10 minutes) and rewrites nothing these graphs need. Folding
    constants twice also turns SplitToSequence/SequenceAt into Split."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    log = logging.getLogger("onnx_ir")
    level = log.level
    log.setLevel(logging.ERROR)  # per-initializer chatter of its passes
    try:
        common.InlinePass()(model)
        for _ in range(2):
            fold_constants(model, onnx_shape_inference=True, input_size_limit=FOLD_LIMIT,
                           output_size_limit=FOLD_LIMIT, should_fold=_never_read_weights)
            common.RemoveUnusedNodesPass()(model)
        for step in (common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
                     common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                     common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
                     common.OutputFixPass(), common.NameFixPass()):
            step(model)
    finally:
        log.setLevel(level)


def _never_read_weights(node) -> bool | None:
    """Folding policy: a node reading an external initializer (a weight) is left to the runtime."""
    import onnx_ir as ir

    reads_weight = any(v is not None and isinstance(v.const_value, ir.ExternalTensor) for v in node.inputs)
    return False if reads_weight else None  # None: the optimizer's own size limits decide


def _dtype_name(elem_type: int) -> str:
    import onnx

    bf16 = elem_type == onnx.TensorProto.BFLOAT16
    return "bfloat16" if bf16 else str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


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

    g = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    double, int64 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    info = {v.name: v for v in list(g.input) + list(g.output) + list(g.value_info)}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t.data_type for t in g.initializer}
    issues = _lint_float8(g, info, inits, producer)
    for v in list(g.input) + list(g.output):
        if any(not isinstance(d, int) or d <= 0 for d in _dims(v)):
            issues.append(LintIssue(v.name, "graph I/O", f"dynamic shape {_dims(v)}"))
        if v.type.tensor_type.elem_type == double:
            issues.append(LintIssue(v.name, "graph I/O", "float64"))
    for t in g.initializer:
        if t.data_type == double:
            issues.append(LintIssue(t.name, "initializer", "float64 initializer"))
        if t.data_type == int64 and math.prod(t.dims) > _INT64_MAX_CONST:
            issues.append(LintIssue(t.name, "initializer", f"int64 initializer of {math.prod(t.dims)} elements"))
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
                v, src = info.get(i), producer.get(i)
                # a constant int64 operand after the data input is a parameter (axes, pads, shape): fine
                param = k > 0 and (i in inits or (src is not None and src.op_type == "Constant"))
                if not param and v is not None and v.type.tensor_type.elem_type == int64:
                    issues.append(LintIssue(name, n.op_type, f"computes on int64 input {i!r}"
                                            + (f" (from {src.op_type})" if src is not None else "")))
    return issues


_FLOAT8_OTHER = ("FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _lint_float8(g, info, inits, producer) -> list[LintIssue]:
    """float8 e4m3fn through explicit Q/DQ only (module docstring); other 8/4-bit float types not at all.
    Constant nodes are left to the other rules (the exporter lifts them into initializers)."""
    import onnx

    e4m3 = onnx.TensorProto.FLOAT8E4M3FN
    other = {getattr(onnx.TensorProto, n) for n in _FLOAT8_OTHER if hasattr(onnx.TensorProto, n)}

    def elem(name):
        return inits[name] if name in inits else info[name].type.tensor_type.elem_type if name in info else None

    issues = []
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type in other | {e4m3}:
            issues.append(LintIssue(v.name, "graph I/O", "float8 graph input/output (quantize inside the graph)"))
    for n in g.node:
        name = n.name or (n.output[0] if n.output else "?")
        for k, i in enumerate(n.input):
            t = elem(i) if i else None
            if t in other:
                issues.append(LintIssue(name, n.op_type, f"input {i!r} is a float type TensorRT does not take here"))
            elif t == e4m3 and not (n.op_type == "DequantizeLinear" and k in (0, 2)) and not (
                    n.op_type == "QuantizeLinear" and k == 2):
                issues.append(LintIssue(name, n.op_type, f"computes on float8 input {i!r} (only through Q/DQ)"))
        for o in n.output:
            if n.op_type != "QuantizeLinear" and elem(o) == e4m3:
                issues.append(LintIssue(name, n.op_type, f"output {o!r} is float8 (only QuantizeLinear makes float8)"))
        if n.op_type in _QDQ:
            for i in n.input[1:]:
                src = producer.get(i)
                if i and i not in inits and not (src is not None and src.op_type == "Constant"):
                    issues.append(LintIssue(name, n.op_type, f"scale/zero point {i!r} is not a constant"))
    return issues


class OrtRunner:
    """One onnxruntime session per graph, fed and read by contract names (CPU, for checks and tests)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # compute the graph as written: onnxruntime's Q/DQ rewrites (propagating float8 Q/DQ through a
        # Transpose, fusing into quantized kernels) produce float8 Transposes its CPU provider cannot run
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        feed = dict(zip(self.input_names, inputs))
        if any(t.dtype == torch.bfloat16 for t in feed.values()):
            raise TypeError("onnxruntime's CPU provider has no bfloat16 kernels for these graphs; check in float32")
        feed = {n: t.detach().cpu().contiguous().numpy() for n, t in feed.items()}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


