"""The fp8 rewrite of an exported DiT graph (``onnx_ir``), run by ``export_onnx`` before the optimizer:
each weight stored as float8 feeds ``DequantizeLinear(W_fp8, W_scale, axis=0)``, and the activation input
of the MatMul/Gemm it reaches goes through ``QuantizeLinear -> DequantizeLinear`` with the Linear's
calibrated scale; a quantized weight that reaches no GEMM is an error naming it. Why before the
optimizer: ``docs/ARCHITECTURE.md``, "The fp8 scheme"."""

from __future__ import annotations

import torch

from .fp8 import FP8, Calibration, scale_name
from .weights_file import WeightsLayout

__all__ = ["quantize_graph"]

_PASS_THROUGH = ("Transpose", "Cast", "Reshape", "Identity")
_GEMMS = ("MatMul", "Gemm")


def _torch_dtype(dt) -> torch.dtype:
    import onnx_ir as ir

    table = {ir.DataType.FLOAT: torch.float32, ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.FLOAT16: torch.float16}
    if dt not in table:
        raise ValueError(f"fp8: cannot quantize a {dt} activation (float32, bfloat16 or float16 only)")
    return table[dt]


def _gemm_uses(value, weight: str):
    """(node, input index) of every MatMul/Gemm that ``value`` reaches through pass-through ops."""
    found = []
    for node, idx in list(value.uses()):
        if node.op_type in _GEMMS:
            found.append((node, idx))
        elif node.op_type in _PASS_THROUGH and idx == 0:
            found.extend(_gemm_uses(node.outputs[0], weight))
        else:
            raise ValueError(f"fp8: the quantized weight {weight!r} feeds {node.op_type} node {node.name!r}, "
                             "not a MatMul/Gemm")
    return found


def _node(op: str, inputs, out: str, shape, dtype, **ints):
    """One single-output node with its output named and typed (the exporter's graphs are fully typed)."""
    import onnx_ir as ir

    node = ir.Node("", op, inputs, attributes=[ir.AttrInt64(k, v) for k, v in ints.items()], name=f"{out}_node")
    node.outputs[0].name, node.outputs[0].shape, node.outputs[0].dtype = out, shape, dtype
    return node


def _initializer(graph, name: str, value, shape, dtype):
    """Register a new initializer ``name`` holding ``value`` (an onnx_ir tensor) and return its Value."""
    import onnx_ir as ir

    v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=value)
    graph.register_initializer(v)
    return v


def quantize_graph(model, names: dict[str, str], layout: WeightsLayout, calibration: Calibration) -> tuple[int, int]:
    """Rewrite ``model`` (onnx_ir) in place (``names``: graph initializer -> layout name); returns
    (weights dequantized, activation Q/DQ pairs inserted)."""
    import onnx_ir as ir

    g, f8 = model.graph, ir.DataType.FLOAT8E4M3FN
    zero = _initializer(g, "fp8_zero_point", ir.tensor(torch.zeros((), dtype=FP8), name="fp8_zero_point"), [], f8)
    n_w = n_a = 0
    for gname, w in list(g.initializers.items()):
        lname = names.get(gname)
        if lname is None or layout.slots[lname].dtype != FP8:
            continue
        ext, rows = w.const_value, layout.slots[lname].shape[0]
        if not isinstance(ext, ir.ExternalTensor) or ext.dtype != f8:
            raise ValueError(f"fp8: {gname!r} does not point at float8 bytes of the weights file")
        compute = w.dtype  # what the traced graph computes in; the scale and the dequantized weight share it
        slot, sname = layout.slots[scale_name(lname)], f"{gname}_scale"
        scale = _initializer(g, sname, ir.ExternalTensor(ext.location, slot.offset, slot.nbytes, compute,
                                                         shape=ir.Shape([rows]), name=sname, base_dir=ext.base_dir),
                             [rows], compute)
        uses = list(w.uses())
        dq = _node("DequantizeLinear", [w, scale], f"{gname}_dequantized", w.shape, compute, axis=0)
        for node, idx in uses:
            node.replace_input_with(idx, dq.outputs[0])
        w.dtype = f8
        g.insert_before(g.node(0), dq)  # reads initializers only: first is always in order
        n_w += 1
        for gemm, idx in _gemm_uses(dq.outputs[0], gname):
            if idx not in (0, 1):
                raise ValueError(f"fp8: the quantized weight {gname!r} is the bias of {gemm.name!r}")
            act = gemm.inputs[1 - idx]
            dt, tag = act.dtype, f"{gname}_input{n_a}"
            s = torch.tensor(calibration.scale(lname, _torch_dtype(dt)), dtype=_torch_dtype(dt))
            sv = _initializer(g, f"{tag}_scale", ir.tensor(s, name=f"{tag}_scale"), [], dt)
            q = _node("QuantizeLinear", [act, sv, zero], f"{tag}_fp8", act.shape, f8)
            dqa = _node("DequantizeLinear", [q.outputs[0], sv, zero], f"{tag}_dequantized", act.shape, dt)
            g.insert_before(gemm, [q, dqa])
            gemm.replace_input_with(1 - idx, dqa.outputs[0])
            n_a += 1
    return n_w, n_a
