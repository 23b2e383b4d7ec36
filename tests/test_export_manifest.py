"""Manifest refusal rules, the TensorRT lint naming offending nodes, and the early memory refusal."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")

from hallolive_rt.export.contracts import contracts_for, dit_contract  # noqa: E402
from hallolive_rt.export.main import ExportError, export_main  # noqa: E402
from hallolive_rt.errors import InputError
from hallolive_rt.options import ModelSource
from hallolive_rt.export.manifest import MANIFEST, ArtifactMismatch, load_artifacts  # noqa: E402
from hallolive_rt.export.onnx import OnnxLintError, check_onnx  # noqa: E402
from hallolive_rt.export.submodels import check_disk, check_memory, estimate_peak_bytes, param_bytes  # noqa: E402
from hallolive_rt.profile import load_profile  # noqa: E402

REBUILD = "hallolive-rt export --preset tiny --random-weights --seed 0 --format onnx --precision fp32 --out-dir"


@pytest.fixture()
def text_dir(tmp_path):
    export_main(ModelSource("tiny", random_weights=True), "onnx", None, tmp_path, submodels=("text",), log=lambda s: None)
    return tmp_path


def test_valid_directory_loads(text_dir):
    arts = load_artifacts(text_dir, load_profile("tiny"), "random:0", "cpu", fmt="onnx")
    assert arts.variants("text") == ["t512"] and arts.path("text", "t512").is_file()
    m = arts.manifest
    assert m["weights"] == {"text": "random:0"} and m["time_embedding"] == "float32"
    assert m["contracts"]["text"]["variants"][0]["inputs"][0] == {"name": "ids", "shape": [1, 512], "dtype": "int64"}


def test_tampered_manifest_refused(text_dir):
    p = text_dir / MANIFEST
    m = json.loads(p.read_text())
    m["precision"] = "bf16"
    p.write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match="modified after export") as e:
        load_artifacts(text_dir, load_profile("tiny"), "random:0")
    assert REBUILD in str(e.value)


def test_other_profile_weights_and_missing_file_refused(text_dir):
    other = load_profile("tiny").with_overrides(blocks=4)
    with pytest.raises(ArtifactMismatch, match=r"profile: artifacts built for tiny \(\w+\), this run uses tiny") as e:
        load_artifacts(text_dir, other, "random:0")
    assert REBUILD in str(e.value)
    with pytest.raises(ArtifactMismatch, match="weights of text: artifacts built from random:0, this run has random:1"):
        load_artifacts(text_dir, load_profile("tiny"), "random:1")
    onnx_file = next(text_dir.glob("text_*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"x")
    with pytest.raises(ArtifactMismatch, match="artifact text/t512 was modified"):
        load_artifacts(text_dir, load_profile("tiny"), "random:0")
    onnx_file.unlink()
    with pytest.raises(ArtifactMismatch, match="missing artifact text/t512") as e:
        load_artifacts(text_dir, load_profile("tiny"), "random:0")
    assert REBUILD in str(e.value)
    with pytest.raises(ArtifactMismatch, match="no manifest.json"):
        load_artifacts(text_dir / "nowhere", load_profile("tiny"), "random:0")


def test_lint_names_offending_nodes(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    p = load_profile("tiny")
    var = dit_contract(p).variants[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", 4])
    nodes = [helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_double"),
             helper.make_node("Det", ["xd"], ["d"], name="det_node"),
             helper.make_node("Identity", ["xd"], ["y"], name="out")]
    model = helper.make_model(helper.make_graph(nodes, "bad", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    from hallolive_rt.export.onnx import lint_tensorrt

    text = "\n".join(str(i) for i in lint_tensorrt(model))
    assert "node 'to_double' (Cast): casts to float64" in text
    assert "node 'det_node' (Det): operator outside TensorRT's ONNX support list" in text
    assert "dynamic shape" in text and "float64" in text
    with pytest.raises(OnnxLintError):
        check_onnx(path, var)


def test_full_size_onnx_fits_24_gib_and_aoti_is_refused_early():
    """ONNX streams the DiT and the text encoder (nothing resident), so the full preset fits a 24 GiB
    machine (measured run: bench/results/cpu-export-onnx-512x992.json); AOTInductor holds real
    modules and is refused up front where they cannot fit, naming each sub-model."""
    p = load_profile("hallolive-512x992")
    dit_gib = param_bytes("dit", p, torch.bfloat16) / 2**30
    assert 21 < dit_gib < 22.5  # 11.66e9 parameters in bf16
    subs = ("dit", "vae_video", "audio", "text")
    contracts = contracts_for(p, torch.bfloat16)
    for s in subs:
        assert estimate_peak_bytes(s, p, torch.bfloat16, "onnx", contracts[s]) < 12 * 2**30, s  # umT5 embedding: 4 GiB fp32
    check_memory(p, subs, torch.bfloat16, "onnx", "cpu", available=24 * 2**30)  # does not raise
    with pytest.raises(ExportError, match=r"dit needs ~\d+\.\d GiB .*24\.0 GiB available") as e:
        check_memory(p, subs, torch.bfloat16, "aoti", "cpu", available=24 * 2**30)
    assert "Sub-models that fit" in str(e.value)
    with pytest.raises(ExportError, match=r"dit needs ~\d+\.\d GiB \(weights streamed to disk"):
        check_memory(p, subs, torch.bfloat16, "onnx", "cpu", available=1 * 2**30)


def test_full_size_onnx_refused_when_the_disk_is_too_small(tmp_path):
    p = load_profile("hallolive-512x992")
    with pytest.raises(ExportError, match=r"not enough disk under .*dit 21\.\d GiB.*10\.0 GiB free"):
        check_disk(p, ("dit", "text"), torch.bfloat16, tmp_path, free=10 * 2**30)
    assert not any(tmp_path.iterdir())


def test_flag_conflicts_refused():
    with pytest.raises(InputError, match="--model-dir and --random-weights exclude each other"):
        export_main(ModelSource("tiny", model_dir="/x", random_weights=True), "onnx", None, "/tmp/never")
    with pytest.raises(InputError, match="the tiny preset has no released weights"):
        export_main(ModelSource("tiny", model_dir="/x"), "onnx", None, "/tmp/never")
    with pytest.raises(ExportError, match="fp8 needs opset 19 or 20"):
        export_main(ModelSource("tiny", random_weights=True), "onnx", "fp8", "/tmp/never", opset=18)
