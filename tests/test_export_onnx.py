"""Tiny-preset ONNX export: every graph runs in onnxruntime and matches PyTorch (fp32), the DiT and the
video VAE in a 3-block / 3-frame streaming replay with state carried between calls.

Tolerances (fp32, CPU): single graphs atol 1e-4 (observed ~1e-6); 3-block DiT replay committed latents
atol 2e-4 (observed ~1e-6: the graphs and eager use the same float32 time embedding).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hallolive_rt.export.contracts import DIT_CACHES, contracts_for  # noqa: E402
from hallolive_rt.export.main import export_main  # noqa: E402
from hallolive_rt.options import ModelSource
from hallolive_rt.export.manifest import load_artifacts  # noqa: E402
from hallolive_rt.export.onnx import OrtRunner  # noqa: E402
from hallolive_rt.export.submodels import build_submodel, wrapper_for  # noqa: E402
from hallolive_rt.profile import load_profile  # noqa: E402
from hallolive_rt.sampler import TorchNoise  # noqa: E402
from hallolive_rt.stream import BlockStream  # noqa: E402
from tests.conftest import assert_close  # noqa: E402
from tests.dit_fixtures import tiny_inputs  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    lines = []
    export_main(ModelSource("tiny", random_weights=True), "onnx", None, out, log=lines.append)
    return out, lines


def _run_stream(dit, profile, step_factory=None):
    nv, na, ctx = tiny_inputs(profile, profile.stream.blocks)
    bs = BlockStream(dit, profile)
    if step_factory is not None:
        bs.step_fn = step_factory(bs)
    fb, n = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    outs = list(bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * n:(i + 1) * n],
                       TorchNoise(3)))
    return torch.cat([o.video for o in outs], 1), torch.cat([o.audio for o in outs], 1), bs


def test_dit_three_block_replay_matches_eager(exported):
    out, _ = exported
    p = load_profile("tiny")
    arts = load_artifacts(out, p, "random:0", "cpu", fmt="onnx", submodels=("dit",))
    contract = contracts_for(p)["dit"]
    runners = {(v.static["audio_len"], v.static["video_kv_len"]): OrtRunner(arts.path("dit", v.name))
               for v in contract.variants}
    dit = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    dit.video_model.time_fp64 = dit.audio_model.time_fp64 = False  # what the ONNX graphs were traced with
    ref_v, ref_a, _ = _run_stream(dit, p)
    used = []

    def factory(bs):
        def step(xv, xa, vt, at, plan):
            st, c = bs.state, bs.cursor
            used.append(plan.variant)
            res = runners[plan.variant](xv, xa, vt, at, *st.tensors().values(), c.video_slot, c.frame0, c.audio0)
            for name, new in zip(DIT_CACHES, res[2:]):  # functional graph: write the updated caches back
                getattr(st, name).copy_(new)
            return res[0], res[1]
        return step

    got_v, got_a, _ = _run_stream(dit, p, factory)
    assert sorted(set(used)) == sorted(runners), "every exported variant ran"
    assert_close(got_v, ref_v, atol=2e-4, rtol=1e-4)
    assert_close(got_a, ref_a, atol=2e-4, rtol=1e-4)


def test_vae_stream_carries_history(exported):
    out, _ = exported
    p = load_profile("tiny")
    arts = load_artifacts(out, p, "random:0", "cpu", fmt="onnx", submodels=("vae_video",))
    dec = build_submodel("vae_video", p, None, 0, torch.float32, "cpu")
    first, nxt = OrtRunner(arts.path("vae_video", "first")), OrtRunner(arts.path("vae_video", "next"))
    v = p.video
    z = torch.randn(1, v.latent_channels, 3, v.latent_height, v.latent_width, generator=torch.Generator().manual_seed(5))
    state = dec.new_state(1, v.latent_height, v.latent_width)
    hist = [h.clone() for h in state.history]
    for i in range(3):
        zi = z[:, :, i:i + 1]
        with torch.no_grad():
            ref = dec.decode_frame(zi, state, first=i == 0)
        res = (first if i == 0 else nxt)(zi, *hist)
        hist = res[1:]
        assert_close(res[0], ref, atol=1e-4, rtol=1e-4)
        for h, r in zip(hist, state.history):
            assert_close(h, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sub", ["audio", "text"])
def test_audio_and_text_graphs_match(exported, sub):
    out, _ = exported
    p = load_profile("tiny")
    arts = load_artifacts(out, p, "random:0", "cpu", fmt="onnx", submodels=(sub,))
    model = build_submodel(sub, p, None, 0, torch.float32, "cpu")
    contract = contracts_for(p)[sub]
    for v in contract.variants:
        ins = v.sample_inputs(seed=7)
        if sub == "text":
            ins[0] = torch.randint(0, 256, ins[0].shape, generator=torch.Generator().manual_seed(1))
            ins[1][:, :40] = 1
        with torch.no_grad():
            ref = wrapper_for(sub, model, contract, v, functional=True)(*ins)
        got = OrtRunner(arts.path(sub, v.name))(*ins)[0]
        assert ref.abs().max() > 0
        assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rerun_skips_up_to_date(exported):
    out, first_lines = exported
    assert sum("exported" in ln for ln in first_lines) == 8  # 3 DiT + 2 VAE + 2 audio + 1 text
    lines = []
    export_main(ModelSource("tiny", random_weights=True), "onnx", None, out, log=lines.append)
    assert len(lines) == 8 and all("skipped (up to date)" in ln for ln in lines), lines
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["weights_files"]) == ["audio", "dit", "text", "vae_video"]


def test_graphs_share_one_weights_file_and_a_lost_graph_is_rebuilt_alone(exported):
    """Every DiT variant points into the one dit weights file (page-aligned, in bounds); deleting one
    graph re-exports that graph only and keeps the weights file (checked by hash, not rewritten)."""
    import onnx

    out, _ = exported
    m = json.loads((out / "manifest.json").read_text())
    wf = m["weights_files"]["dit"]
    size = (out / wf["file"]).stat().st_size
    graphs = [a for a in m["artifacts"].values() if a["submodel"] == "dit"]
    assert len(graphs) == 3 and all(a["data_file"] == wf["file"] for a in graphs)
    for a in graphs:
        g = onnx.load(str(out / a["file"]), load_external_data=False).graph
        ext = [{e.key: e.value for e in t.external_data} for t in g.initializer if t.external_data]
        assert len(ext) > 100 and all(e["location"] == wf["file"] for e in ext)
        assert all(int(e["offset"]) % 4096 == 0 and int(e["offset"]) + int(e["length"]) <= size for e in ext)
    mtime = (out / wf["file"]).stat().st_mtime_ns
    (out / graphs[0]["file"]).unlink()
    lines = []
    export_main(ModelSource("tiny", random_weights=True), "onnx", None, out, submodels=("dit",), log=lines.append)
    assert f"[export] dit: weights skipped (up to date) {wf['file']}" in lines
    assert sum("exported" in ln for ln in lines) == 1 and sum(ln.startswith("[export] dit/") and "skipped" in ln for ln in lines) == 2
    assert (out / wf["file"]).stat().st_mtime_ns == mtime and (out / graphs[0]["file"]).is_file()
