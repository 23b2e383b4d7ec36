"""The shared ONNX weights file and the streamed sub-model sources behind it.

What must hold: the layout is deterministic and page-aligned; written bytes read back bit-exactly (fp32 and
bf16); a source that disagrees with the model fails naming the tensor and leaves no file; the streamed
random values equal the ones ``build_submodel`` gives on the CPU (so the exported graphs compute the model
the runtime builds); a release file is checked against the model before a byte is written; tracing on the
meta device puts every real tensor back.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")

from hallolive_rt.export.submodels import SUBMODEL_FILES, build_submodel, onnx_source  # noqa: E402
from hallolive_rt.export.weights_file import (ALIGN, WeightsFileError, WeightsLayout, module_tensors,  # noqa: E402
                                              on_meta, tensor_names, write_weights)
from hallolive_rt.profile import load_profile  # noqa: E402
from hallolive_rt.weights import CheckpointError  # noqa: E402


def _specs():
    return [("a", (3, 5), torch.float32), ("b", (), torch.bfloat16), ("c", (7,), torch.bfloat16), ("d", (0, 4), torch.float32)]


def test_layout_is_aligned_and_deterministic():
    lay = WeightsLayout(_specs())
    offsets = [s.offset for s in lay.slots.values()]
    assert offsets == [0, ALIGN, 2 * ALIGN, 3 * ALIGN] and lay.total == 3 * ALIGN
    assert [s.nbytes for s in lay.slots.values()] == [60, 2, 14, 0]
    assert lay.digest() == WeightsLayout(_specs()).digest()
    assert lay.digest() != WeightsLayout(list(reversed(_specs()))).digest()


def test_written_bytes_read_back_exactly(tmp_path):
    lay = WeightsLayout(_specs())
    vals = {"a": torch.randn(3, 5), "b": torch.tensor(1.5), "c": torch.randn(7), "d": torch.empty(0, 4)}
    path = write_weights(tmp_path / "w.weights", lay, reversed(list(vals.items())))  # any order
    raw = path.read_bytes()
    assert len(raw) == lay.total and not list(tmp_path.glob("*.partial"))
    for name, v in vals.items():
        s = lay.slots[name]
        chunk = bytearray(raw[s.offset:s.offset + s.nbytes])
        got = torch.frombuffer(chunk, dtype=s.dtype) if chunk else torch.empty(0, dtype=s.dtype)
        assert torch.equal(got.reshape(s.shape), v.to(s.dtype)), name  # fp32 -> bf16 cast on write


@pytest.mark.parametrize("bad, match", [
    ([("a", torch.zeros(5, 3))], r"'a' has shape \(5, 3\), the model expects \(3, 5\)"),
    ([("zz", torch.zeros(1))], r"a value named 'zz' has no place"),
    ([("a", torch.zeros(3, 5)), ("a", torch.zeros(3, 5))], r"'a' was given twice"),
    ([("a", torch.zeros(3, 5))], r"no value for 3 tensor\(s\): b, c, d"),
])
def test_bad_source_names_the_tensor_and_leaves_nothing(tmp_path, bad, match):
    with pytest.raises(WeightsFileError, match=match):
        write_weights(tmp_path / "w.weights", WeightsLayout(_specs()), bad, what="dit")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("sub", ["dit", "text", "audio"])
def test_streamed_random_values_equal_the_built_model(sub):
    p = load_profile("tiny")
    src = onnx_source(sub, p, None, 3, torch.float32)
    built = build_submodel(sub, p, None, 3, torch.float32, "cpu")
    want = dict(module_tensors(built))
    got = dict(src.values())
    assert got.keys() == want.keys() == WeightsLayout.of(src.model).slots.keys()
    for name, v in want.items():
        assert torch.equal(got[name].to(v.dtype), v), name


def test_release_dit_is_checked_before_writing(tmp_path):
    p = load_profile("tiny")
    built = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    ckpt = tmp_path / SUBMODEL_FILES["dit"][0]
    ckpt.parent.mkdir(parents=True)
    sd = {"model." + k: v for k, v in built.state_dict().items()}  # the released flat layout
    torch.save(sd, ckpt)
    src = onnx_source("dit", p, str(tmp_path), 0, torch.bfloat16)
    got = dict(src.values())
    assert all(torch.equal(got[k], v) for k, v in built.state_dict().items())
    sd.pop(next(iter(sd)))
    torch.save(sd, ckpt)
    with pytest.raises(CheckpointError, match=r"hallolive_dit\.pt: does not match the Hallo-Live DiT\s+missing keys 1"):
        onnx_source("dit", p, str(tmp_path), 0, torch.bfloat16)


def test_on_meta_restores_every_tensor():
    model = build_submodel("audio", load_profile("tiny"), None, 0, torch.float32, "cpu")
    before = {n: t for n, t in module_tensors(model)}
    names = tensor_names(torch.nn.Sequential(model), model)
    assert names and all(k == "0." + v for k, v in names.items())
    with on_meta(model):
        assert all(t.is_meta for _, t in module_tensors(model))
    after = dict(module_tensors(model))
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
