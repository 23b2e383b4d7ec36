"""``--precision fp8``: the quantized DiT graph (tiny preset, one block = one variant, CPU).

What must hold: the graph passes check_onnx (checker, contract I/O, TensorRT lint); it dequantizes one float8
weight per Linear that the block step runs (axis 0, its scale from the weights file) and every such GEMM's
activation comes through QuantizeLinear -> DequantizeLinear; the weights file holds float8 rows and scales
that reproduce ``quantize_rows``; onnxruntime's CPU provider (which runs float8 Q/DQ) matches a PyTorch
fake-quant reference of the same scheme and scales, and the unquantized model within fp8 error; a bfloat16
compute run (what the full size exports) passes the checks with bfloat16 scales; the full-size
request on a CPU, an fp8 opset 18 and fp8 AOTInductor are refused before anything is written.

Tolerances (float32 compute, CPU, sample inputs of the contract, seed 7):
  * vs the fake-quant reference: atol 1e-5 + rtol 1e-5 (the same float8 values on both sides; measured max
    abs err 7.2e-7 on caches of magnitude ~4, 0 on the flows: only float32 accumulation order differs);
  * vs the unquantized float32 module (fp8 error: e4m3 keeps 3 mantissa bits; the sample inputs are not the
    calibration's stream, so some activations clip): mean |err| / mean |ref| below 0.1 (measured 0.037-0.075,
    flow_a the largest) and max |err| / max |ref| below 0.15 (measured 0.038-0.096).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hallolive_rt.export.contracts import contracts_for  # noqa: E402
from hallolive_rt.export.fp8 import FP8, calibrate_dit, fake_quant, quantize_rows  # noqa: E402
from hallolive_rt.export.main import ExportError, export_main  # noqa: E402
from hallolive_rt.options import ModelSource
from hallolive_rt.export.onnx import OrtRunner, check_onnx, lint_tensorrt  # noqa: E402
from hallolive_rt.export.submodels import build_submodel, onnx_source, wrapper_for  # noqa: E402
from hallolive_rt.profiles import __file__ as _profiles_init  # noqa: E402
from hallolive_rt.profile import load_profile  # noqa: E402
from tests.conftest import assert_close  # noqa: E402


def _export_one_block(root, dtype: str = "float32"):
    """The tiny preset with one block (one DiT variant, one calibration block) and its fp8 DiT export."""
    from pathlib import Path

    toml = root / "tiny1.toml"
    text = (Path(_profiles_init).parent / "tiny.toml").read_text()
    assert "\nblocks = 3\n" in text and '\ndtype = "float32"\n' in text
    toml.write_text(text.replace("\nblocks = 3\n", "\nblocks = 1\n").replace('"float32"', f'"{dtype}"'))
    out = root / "out"
    lines = []
    export_main(ModelSource(str(toml), random_weights=True), "onnx", "fp8", out, submodels=("dit",), log=lines.append)
    p = load_profile(toml)
    variant = contracts_for(p)["dit"].variants[0]
    return p, variant, out, lines


@pytest.fixture(scope="module")
def one_block(tmp_path_factory):
    return _export_one_block(tmp_path_factory.mktemp("fp8"))


def _graph(out):
    import onnx

    (f,) = out.glob("dit_*_fp8.onnx")
    return f, onnx.load(str(f), load_external_data=False)


def _step_linears(p, variant) -> list[str]:
    """Weight names of the Linears one block step runs (forward pre-hooks on the eager wrapper)."""
    dit = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    ran = []
    hooks = [m.register_forward_pre_hook(lambda *_a, n=n: ran.append(f"{n}.weight"))
             for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        wrapper_for("dit", dit, contracts_for(p)["dit"], variant, functional=True)(*variant.sample_inputs(seed=7))
    for h in hooks:
        h.remove()
    return sorted(set(ran))


def test_graph_dequantizes_every_step_linear_and_quantizes_its_input(one_block):
    import onnx

    p, variant, out, lines = one_block
    path, model = _graph(out)
    check_onnx(path, variant)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    fp8_inits = {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in fp8_inits]
    linears = _step_linears(p, variant)
    assert len(weight_dq) == len(linears) == 48
    assert {n.input[0].removeprefix("dit.") for n in weight_dq} == set(linears)
    assert all(a.name == "axis" and a.i == 0 for n in weight_dq for a in n.attribute)
    dq_out = {n.output[0] for n in weight_dq}
    gemms = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        srcs = [producer.get(i) for i in n.input[:2]]
        # the weight side: DequantizeLinear, possibly through its Transpose
        w_side = [k for k, s in enumerate(srcs) if s is not None and (s.output[0] in dq_out or (
            s.op_type == "Transpose" and s.input[0] in dq_out))]
        if w_side:
            act = srcs[1 - w_side[0]]
            assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear", n.name
            gemms.append(n)
    assert len(gemms) == 48
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert 0 < len(q) <= 48  # q/k/v (and the fusion k/v) share one input: merged by CSE
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp8" and m["opset"] == 19 and m["fp8"]["submodels"] == ["dit"]
    assert m["fp8"]["calibration"] == {"blocks": 1, "seed": 0, "inputs": "seeded random noise and prompt context",
                                       "device": "cpu"}
    assert any("fp8 Q/DQ on 48 weights" in ln for ln in lines)


def test_bfloat16_compute_graph_checks(tmp_path):
    """The full-size compute dtype (bfloat16; onnxruntime cannot run it on CPU): the graph passes the
    checks and every Q/DQ scale is bfloat16, as opsets 19-20 require for bfloat16 activations."""
    import onnx

    p, variant, out, _ = _export_one_block(tmp_path, "bfloat16")
    path, model = _graph(out)
    check_onnx(path, variant)
    g = model.graph
    kind = {t.name: t.data_type for t in g.initializer}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sum(kind.get(n.input[0]) == onnx.TensorProto.FLOAT8E4M3FN for n in qdq) == 48
    assert {kind[n.input[1]] for n in qdq} == {onnx.TensorProto.BFLOAT16}
    assert json.loads((out / "manifest.json").read_text())["fp8"]["others"] == "bfloat16"


def test_weights_file_holds_float8_rows_and_scales(one_block):
    p, _, out, _ = one_block
    path, model = _graph(out)
    raw = (out / "dit_tiny_fp8.weights").read_bytes()
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data}
    name = "dit.video_model.blocks.0.ffn.0.weight"
    src = onnx_source("dit", p, None, 0, torch.float32)
    w = dict(src.values())[name.removeprefix("dit.")]
    q, s = quantize_rows(w, torch.float32)

    def read(n, dtype):
        e = ext[n]
        return torch.frombuffer(bytearray(raw[int(e["offset"]):int(e["offset"]) + int(e["length"])]), dtype=dtype)

    assert torch.equal(read(name, torch.uint8), q.reshape(-1).view(torch.uint8))
    assert torch.equal(read(f"{name}_scale", torch.float32), s)
    assert q.dtype == FP8 and (q.float().abs().amax(1) == 448).all()  # every row uses the full range
    err = ((q.float() * s[:, None] - w).abs().amax(1) / w.abs().amax(1)).max()
    assert err < 2 ** -4  # e4m3: 3 mantissa bits, half an ulp relative at most


def test_onnxruntime_matches_fake_quant_reference(one_block):
    from hallolive_rt.export.dit import dit_export_mode

    p, variant, out, _ = one_block
    path, _ = _graph(out)
    contract = contracts_for(p)["dit"]
    dit = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    src = onnx_source("dit", p, None, 0, torch.float32)
    cal = calibrate_dit(src.model, src.values(), p, seed=0, device="cpu", dtype=torch.float32)
    ins = variant.sample_inputs(seed=7)
    got = OrtRunner(path)(*ins)
    with dit_export_mode(dit, float64_time=False), torch.no_grad():
        wrapper = wrapper_for("dit", dit, contract, variant, functional=True)
        exact = wrapper(*ins)
        hooks = []
        for n, m in dit.named_modules():
            if isinstance(m, torch.nn.Linear):
                q, s = quantize_rows(m.weight, torch.float32)
                m.weight.copy_(q.float() * s[:, None])
                a = cal.scale(f"{n}.weight", torch.float32)
                hooks.append(m.register_forward_pre_hook(lambda _m, args, a=a: (fake_quant(args[0], a),)))
        ref = wrapper(*ins)
        for h in hooks:
            h.remove()
    assert len(got) == len(ref) == len(variant.outputs)
    for spec, g, r, e in zip(variant.outputs, got, ref, exact):
        assert_close(g, r, atol=1e-5, rtol=1e-5, what=f"{spec.name} vs fake-quant")
        mean_rel = ((g - e).abs().mean() / e.abs().mean()).item()
        max_rel = ((g - e).abs().max() / e.abs().max()).item()
        assert mean_rel < 0.1 and max_rel < 0.15, f"{spec.name}: fp8 error vs float32 {mean_rel:.3f} / {max_rel:.3f}"
        assert max_rel > 1e-3, f"{spec.name}: no quantization error at all: is the graph quantized?"


def test_full_size_fp8_on_cpu_refused_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match=r"fp8: calibrating .* full hallolive-512x992 DiT .* needs a GPU "
                                          r"\(device='cuda'\); device is 'cpu'"):
        export_main(ModelSource("hallolive-512x992", random_weights=True), "onnx", "fp8", out, device="cpu")
    with pytest.raises(ExportError, match="fp8 needs opset 19 or 20"):
        export_main(ModelSource("tiny", random_weights=True), "onnx", "fp8", out, opset=18)
    with pytest.raises(ExportError, match="fp8 is for --format onnx"):
        export_main(ModelSource("tiny", random_weights=True), "aoti", "fp8", out)
    assert not out.exists()


def test_lint_accepts_qdq_and_flags_float8_compute():
    from onnx import TensorProto, helper

    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [4, 4], bytes(16), raw=True)
    inits = [zp, w, helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("ws", TensorProto.FLOAT, [4], [1.0] * 4)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    ok = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
          helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
          helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0, name="wdq"),
          helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]

    def lint(nodes, ins=(x,), extra=()):
        g = helper.make_graph(nodes, "g", list(ins), [y], inits + list(extra))
        return lint_tensorrt(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))

    assert lint(ok) == []
    bad = ok[:3] + [helper.make_node("Cast", ["w"], ["wc"], to=TensorProto.FLOAT, name="cast_fp8"),
                    helper.make_node("MatMul", ["xd", "wc"], ["y"], name="mm")]
    issues = [str(i) for i in lint(bad)]
    assert issues == ["node 'cast_fp8' (Cast): computes on float8 input 'w' (only through Q/DQ)"]
    s_in = helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [])
    dyn = [helper.make_node("QuantizeLinear", ["x", "s_in", "zp"], ["xq"], name="q")] + ok[1:]
    issues = [str(i) for i in lint(dyn, (x, s_in))]
    assert "node 'q' (QuantizeLinear): scale/zero point 's_in' is not a constant" in issues
    to_fp8 = [helper.make_node("Cast", ["x"], ["x8"], to=TensorProto.FLOAT8E4M3FN, name="cast_to_fp8"),
              helper.make_node("DequantizeLinear", ["x8", "s", "zp"], ["xd"], name="dq")] + ok[2:]
    assert [str(i) for i in lint(to_fp8)] == [
        "node 'cast_to_fp8' (Cast): output 'x8' is float8 (only QuantizeLinear makes float8)"]
    e5m2 = helper.make_tensor_value_info("x5", TensorProto.FLOAT8E5M2, [2, 4])
    issues = [str(i) for i in lint([helper.make_node("Cast", ["x5"], ["y"], to=TensorProto.FLOAT, name="c")], (e5m2,))]
    assert issues == ["node 'x5' (graph I/O): float8 graph input/output (quantize inside the graph)",
                      "node 'c' (Cast): input 'x5' is a float type TensorRT does not take here"], issues
