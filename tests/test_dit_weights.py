"""Loading hallolive_dit.pt in every released layout, and the promised errors on bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hallolive_rt.config import load_fusion_config
from hallolive_rt.model.dit_weights import load_dit
from hallolive_rt.weights import CheckpointError
from tests.dit_fixtures import tiny_dit

CFG = load_fusion_config("video_tiny", "audio_tiny")


def _fsdp(name: str) -> str:
    """The training file's names: '_fsdp_wrapped_module.' after each wrapped module (as in the key list)."""
    parts = name.split(".")
    return ".".join(parts[:2] + ["_fsdp_wrapped_module"] + parts[2:])


@pytest.fixture(scope="module")
def weights():
    return {k: v.clone() for k, v in tiny_dit(seed=3).state_dict().items()}


def _assert_loaded(model, sd, dtype=torch.bfloat16):
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v.to(dtype)), k
    # RoPE tables are recomputed after the meta-device load
    assert model.video_model.rope.cos_t.device.type == "cpu" and model.video_model.rope.cos_t[0, 0] == 1


def test_flat_released_layout_with_model_prefix(tmp_path, weights):
    f = tmp_path / "hallolive_dit.pt"
    torch.save({"model." + k: v.to(torch.bfloat16) for k, v in weights.items()}, f)
    _assert_loaded(load_dit(f, CFG), weights)


def test_nested_training_file_loads_the_entry_ema_asks_for_and_strips_fsdp(tmp_path, weights):
    """The release (inference.py) reads 'generator_ema' only under --use_ema, else 'generator'."""
    f = tmp_path / "checkpoint.pt"
    ema = {_fsdp("model." + k): v for k, v in weights.items()}
    gen = {_fsdp("model." + k): v + 1 for k, v in weights.items()}
    torch.save({"generator_ema": ema, "generator": gen, "critic": {"x": torch.zeros(1)}}, f)
    plus_one = {k: v + 1 for k, v in weights.items()}
    _assert_loaded(load_dit(f, CFG, dtype=torch.float32), plus_one, torch.float32)  # default: no EMA
    _assert_loaded(load_dit(f, CFG, dtype=torch.float32, ema=False), plus_one, torch.float32)
    _assert_loaded(load_dit(f, CFG, dtype=torch.float32, ema=True), weights, torch.float32)
    a = load_dit(f, CFG, dtype=torch.float32).state_dict()
    b = load_dit(f, CFG, dtype=torch.float32, ema=True).state_dict()
    assert all(not torch.equal(a[k], b[k]) for k in a)  # the two entries give different weights


def test_requested_entry_missing_names_the_entries_present(tmp_path, weights):
    f = tmp_path / "checkpoint.pt"
    torch.save({"generator": {"model." + k: v for k, v in weights.items()}, "critic": {"x": torch.zeros(1)}}, f)
    with pytest.raises(CheckpointError) as e:
        load_dit(f, CFG, ema=True)
    msg = str(e.value)
    assert str(f) in msg and "no 'generator_ema' entry" in msg and "holds 'generator'" in msg
    assert "'critic'" in msg and "--no-ema" in msg
    torch.save({"generator_ema": {"model." + k: v for k, v in weights.items()}}, f)
    with pytest.raises(CheckpointError, match="no 'generator' entry .* holds 'generator_ema'.*--ema"):
        load_dit(f, CFG)
    _assert_loaded(load_dit(f, CFG, ema=True), weights)


def test_flat_file_is_its_own_weights_under_either_choice(tmp_path, weights):
    """The released hallolive_dit.pt is flat (one set of weights; the release's script passes --use_ema)."""
    f = tmp_path / "hallolive_dit.pt"
    torch.save({"model." + k: v for k, v in weights.items()}, f)
    _assert_loaded(load_dit(f, CFG, ema=True), weights)
    _assert_loaded(load_dit(f, CFG, ema=False), weights)


def test_ovi_safetensors_naming_without_prefix(tmp_path, weights):
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(f))
    _assert_loaded(load_dit(f, CFG), weights)


def test_missing_unexpected_and_misshaped_keys_are_named_with_counts(tmp_path, weights):
    f = tmp_path / "bad.pt"
    sd = {"model." + k: v for k, v in weights.items()}
    dropped = [k for k in sd if ".ffn." in k]
    for k in dropped:
        del sd[k]
    sd["model.video_model.extra.weight"] = torch.zeros(3)
    sd["model.audio_model.head.head.bias"] = torch.zeros(7)
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        load_dit(f, CFG)
    msg = str(e.value)
    assert str(f) in msg
    assert f"missing keys {len(dropped)}: 'video_model.blocks.0.ffn.0.weight'" in msg and "more" in msg
    assert "unexpected keys 1: 'video_model.extra.weight'" in msg
    assert "audio_model.head.head.bias (file (7,), model (20,))" in msg


def test_not_a_checkpoint_fails_clearly(tmp_path):
    f = tmp_path / "hallolive_dit.pt"
    f.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_dit(f, CFG)
    torch.save([1, 2, 3], f)
    with pytest.raises(CheckpointError, match="top level is a list"):
        load_dit(f, CFG)
    torch.save({"optimizer": {"step": 3}}, f)
    with pytest.raises(CheckpointError, match="no DiT tensors"):
        load_dit(f, CFG)
    with pytest.raises(CheckpointError, match="file not found"):
        load_dit(tmp_path / "nope.pt", CFG)
