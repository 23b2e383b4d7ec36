"""The EMA switch from the command line to the loaded DiT: `--ema/--no-ema` on stream, export and bench,
threaded through ``load_components`` into ``load_dit`` (release: ``generator_ema`` only under --use_ema)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hallolive_rt.cli import app
from hallolive_rt.options import ModelSource
from hallolive_rt.model.text_tokenizer import ByteTokenizer
from hallolive_rt.model.vae_audio import MMAudioVAEConfig, build_audio_decoder
from hallolive_rt.model.vae_video import WanVAEConfig, build_video_decoder
from hallolive_rt.model.vocoder import BigVGANConfig, build_vocoder
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime import components
from hallolive_rt.runtime.components import MODEL_FILES, load_components
from tests.dit_fixtures import tiny_dit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory in the official layout holding tiny files; the DiT is a training file whose
    'generator' and 'generator_ema' entries differ (generator = EMA + 1)."""
    root = tmp_path_factory.mktemp("models")
    paths = MODEL_FILES.resolve(root)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    ema = {"model." + k: v.clone() for k, v in tiny_dit(seed=5).state_dict().items()}
    torch.save({"generator_ema": ema, "generator": {k: v + 1 for k, v in ema.items()}}, paths["dit"])
    torch.save(build_video_decoder(WanVAEConfig.tiny(), device="cpu").state_dict(), paths["video_vae"])
    torch.save(build_audio_decoder(MMAudioVAEConfig.tiny()).state_dict(), paths["audio_vae"])
    torch.save({"generator": build_vocoder(BigVGANConfig.tiny()).state_dict()}, paths["vocoder"])
    paths["text_encoder"].write_bytes(b"not read: with_text=False")
    paths["tokenizer"].mkdir(parents=True, exist_ok=True)
    (paths["tokenizer"] / "tokenizer.json").write_text("{}")
    return root, ema


def _load(root, monkeypatch, **kw):
    # the real umT5 tokenizer needs the `text` extra; the byte tokenizer stands in (the DiT is what is tested)
    monkeypatch.setattr(components, "load_tokenizer", lambda path, text_len: ByteTokenizer(text_len))
    return load_components(load_profile("tiny"), root, with_text=False, **kw)


def test_load_components_threads_ema_to_the_dit(model_dir, monkeypatch):
    root, ema = model_dir
    default = _load(root, monkeypatch).dit.state_dict()
    with_ema = _load(root, monkeypatch, ema=True).dit.state_dict()
    for k, v in ema.items():
        name = k[len("model."):]
        assert torch.equal(with_ema[name], v.to(with_ema[name].dtype)), name
        assert torch.equal(default[name], (v + 1).to(default[name].dtype)), name  # default: 'generator'


@pytest.mark.parametrize("command,target", [
    ("stream", "hallolive_rt.runtime.stream_run.stream_main"),
    ("export", "hallolive_rt.export.main.export_main"),
    ("bench", "hallolive_rt.runtime.bench.bench_main"),
])
def test_cli_ema_flag_reaches_the_command(monkeypatch, command, target):
    import importlib

    mod_name, fn = target.rsplit(".", 1)
    seen = []

    def fake(*args, **kw):
        model = kw.get("model") or next(a for a in args if isinstance(a, ModelSource))
        seen.append(model.ema)
        return {"frames_written": 0, "frames_generated": 0, "audio_samples": 0}

    monkeypatch.setattr(importlib.import_module(mod_name), fn, fake)
    runner = CliRunner()
    for flag, want in ((None, False), ("--ema", True), ("--no-ema", False)):
        r = runner.invoke(app, [command, *([flag] if flag else [])])
        assert r.exit_code == 0, r.output
        assert seen[-1] is want, (command, flag, seen)


def test_export_tags_ema_weights_and_loads_the_entry(model_dir):
    """An EMA export is other weights than a generator export of the same file: its id says so."""
    from hallolive_rt.export.submodels import build_submodel, weights_ids

    root, ema = model_dir
    plain, tagged = weights_ids(str(root), 0, ["dit", "vae_video"]), weights_ids(str(root), 0, ["dit", "vae_video"],
                                                                                 ema=True)
    assert tagged["dit"] == plain["dit"] + "@generator_ema" and tagged["vae_video"] == plain["vae_video"]
    p = load_profile("tiny")
    got = build_submodel("dit", p, str(root), 0, torch.float32, "cpu", ema=True).state_dict()
    assert all(torch.equal(got[k[len("model."):]], v) for k, v in ema.items())
