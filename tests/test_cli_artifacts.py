"""Artifact backends from the command line: `export --format aoti` then `stream|bench --backend(s) aoti
--artifacts DIR` on CPU, checked against the manifest before any weight is loaded; a manifest edited to
claim another profile (digest recomputed) is refused by its recorded contracts, and every refusal's
rebuild command names the directory that was given.

Lean: the session's one AOTInductor compile (``tiny_aoti_dir`` in conftest.py: the DiT's first-block
variant, shared with tests/test_export_aoti.py); one-block streams."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from hallolive_rt.options import DiTOptions, ModelSource, OutputOptions
from hallolive_rt.cli import app
from hallolive_rt.export.manifest import MANIFEST, write_manifest
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime import components
from hallolive_rt.errors import InputError
from hallolive_rt.runtime.stream_run import stream_main


@pytest.fixture()
def art(tiny_aoti_dir):
    return tiny_aoti_dir


@pytest.fixture()
def no_weights(monkeypatch):
    """Fail the test if anything tries to load weights (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the artifact check refused")

    monkeypatch.setattr(components, "load_components", refuse)


def _y4m_frames(path, w, h):
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    frame = 6 + 3 * w * h
    return np.frombuffer(body, np.uint8).reshape(-1, frame)[:, 6:].astype(int)


def test_export_then_stream_and_bench_with_the_aoti_backend(art, tmp_path):
    run = CliRunner()
    outs = {}
    for backend in ("eager", "aoti"):
        d = tmp_path / backend
        d.mkdir()
        extra = ["--artifacts", str(art)] if backend == "aoti" else []
        r = run.invoke(app, ["stream", "--blocks", "1", "--backend", backend, *extra, "--out", str(d / "o.mp4"),
                             "--frames-out", str(d / "o.y4m"), "--metrics", str(d / "m.json"), "--kv-impl", "torch"])
        assert r.exit_code == 0, r.output[-3000:]
        assert json.loads((d / "m.json").read_text())["session"]["backend"] == backend
        outs[backend] = _y4m_frames(d / "o.y4m", 96, 64)
    # the package is the eager forward compiled (fp32): the decoded frames agree to a rounding step
    assert outs["aoti"].shape == outs["eager"].shape == (5, 3 * 96 * 64)
    assert np.abs(outs["aoti"] - outs["eager"]).max() <= 2
    r = run.invoke(app, ["bench", "--preset", "tiny", "--device", "cpu", "--blocks", "1", "--kv-impl", "torch",
                         "--artifacts", str(art), "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output[-3000:]
    assert list(json.loads((tmp_path / "b.json").read_text())["results"]) == ["eager", "aoti"]


def _custom_profile(tmp_path, name, **video):
    """tiny with another latent grid; 6x4 instead of 4x6 keeps the tokens per block (12), so the cache
    layout and the variant names are those of tiny: only the contracts' shapes tell them apart."""
    src = load_profile("tiny").source
    text = open(src).read().replace('name = "tiny"', f'name = "{name}"')
    for k, v in video.items():
        text = text.replace(f"{k} = {getattr(load_profile('tiny').video, k)}", f"{k} = {v}")
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def test_a_manifest_edited_to_claim_another_profile_is_refused_by_its_contracts(art, tmp_path, no_weights):
    moved = tmp_path / "moved"  # the rebuild command must name this folder, not the one it was exported to
    shutil.copytree(art, moved)
    toml = _custom_profile(tmp_path, "tiny-6x4", latent_height=6, latent_width=4)
    prof = load_profile(toml)
    assert prof.video_tokens_per_block == load_profile("tiny").video_tokens_per_block
    m = json.loads((moved / MANIFEST).read_text())
    m["profile"] = {"name": prof.name, "digest": prof.digest()}
    write_manifest(moved, m)  # digest recomputed: the manifest looks genuine
    with pytest.raises(InputError) as e:
        stream_main("hi", model=ModelSource(preset=str(toml)), dit=DiTOptions(backend="aoti", artifacts=str(moved)), outputs=OutputOptions(out=str(tmp_path / "o.mp4")), blocks=1, progress=False)
    msg = str(e.value)
    assert "contract of dit" in msg and "vid_x [1, 2, 48, 4, 6] float32, this run needs vid_x [1, 2, 48, 6, 4]" in msg
    assert f"--out-dir {moved}" in msg and f"--out-dir {art}" not in msg, msg
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("blocks,needle", [
    (2, "no DiT aoti artifact for audio_len=20,video_kv_len=24"),
    ("endless", "were built for cache layout slots=36 sink=0 ring=0 (the append policy), this stream uses slots=36 "
                "sink=12 ring=24"),
])
def test_a_stream_the_directory_cannot_serve_is_refused_before_loading(art, tmp_path, no_weights, blocks, needle):
    with pytest.raises(InputError) as e:
        stream_main("hi", dit=DiTOptions(backend="aoti", artifacts=str(art)), outputs=OutputOptions(out=str(tmp_path / "o.mp4")), blocks=blocks, progress=False)
    assert needle in str(e.value) and f"--out-dir {art}" in str(e.value), str(e.value)
    assert sorted(tmp_path.iterdir()) == []


def test_a_folder_that_is_no_export_is_refused_from_stream_bench_and_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for args in (["stream", "--out", "o.mp4"], ["bench", "--preset", "tiny", "--device", "cpu", "--backends", "aoti"],
                 ["profile", "--out-dir", "prof", "--warmup-runs", "0"]):
        r = CliRunner().invoke(app, [*args, *(["--backend", "aoti"] if args[0] != "bench" else []),
                                     "--artifacts", "empty"])
        assert r.exit_code == 2, (args, r.output[-2000:])
        assert "empty: no manifest.json" in r.stderr and "rebuild: hallolive-rt export --preset tiny" in r.stderr
        assert "--out-dir empty" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
