"""Video decode runners (runtime/vae_runner.py) against the eager decoder, frame by frame from the first.

Tolerances: fp32 layout changes and the aot_eager compile are checked to 1e-5 (bit-equal on this CPU);
bf16 runners against the fp32 eager reference: relative RMS <= 2.5e-2 and max abs <= 0.06 per frame on
outputs in [-1, 1] (measured on this CPU: 1.35e-2 and 0.029). CUDA graphs: 1e-4 (fp32, same kernels).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from hallolive_rt.options import ModelSource, VideoDecodeOptions
from hallolive_rt.runtime.vae_runner import check_vae_options, make_video_runner, set_conv_layout
from tests.conftest import assert_close
from tests.test_vae_video import _tiny  # the tiny decoder with non-trivial norm gains and biases

H, W, FRAMES = 4, 6, 4  # tiny latent grid; frames include the first (1 pixel frame) and steady ones
CL3D = torch.channels_last_3d
FAST_COMPILE = dict(compile_backend="aot_eager")  # inductor on CPU takes minutes (tests/test_vae_video.py: slow)


@pytest.fixture(scope="module")
def dec():
    return _tiny()


@pytest.fixture(scope="module")
def z():
    return torch.randn(1, 48, FRAMES, H, W, generator=torch.Generator().manual_seed(7))


def _reference(dec, z):
    """Plain eager decode_frame on a fresh state, contiguous weights."""
    set_conv_layout(dec, False)
    st = dec.new_state(1, H, W)
    with torch.no_grad():
        return [dec.decode_frame(z[:, :, i:i + 1], st, i == 0).clone() for i in range(z.shape[2])], st


def _decode(runner, z):
    runner.prepare()
    return [runner.decode_frame(z[:, :, i:i + 1], i == 0).clone() for i in range(z.shape[2])]


def test_eager_runner_is_the_plain_decoder_bit_for_bit(dec, z):
    ref, st = _reference(dec, z)
    r = make_video_runner(dec, VideoDecodeOptions.parse("eager"), 1, H, W)
    got = _decode(r, z)
    assert [g.shape[2] for g in got] == [1, 4, 4, 4]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(torch.equal(a, b) for a, b in zip(r.state.history, st.history))


def test_channels_last_runner_equals_eager_and_changes_layout_only(dec, z):
    ref, st = _reference(dec, z)
    weights = {k: v.clone() for k, v in dec.state_dict().items()}
    r = make_video_runner(dec, VideoDecodeOptions.parse("eager+cl3d"), 1, H, W)
    got = _decode(r, z)
    assert r.describe()["label"] == "eager+cl3d" and r.opts.channels_last
    convs = [p for p in dec.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=CL3D) for p in convs)
    assert all(b.is_contiguous(memory_format=CL3D) for b in r.state.history) and r.z.is_contiguous(memory_format=CL3D)
    assert all(torch.equal(v, weights[k]) for k, v in dec.state_dict().items())  # same values
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, rtol=0, atol=1e-5, what=f"channels_last_3d frame {i}")
    for a, b in zip(r.state.history, st.history):
        assert_close(a, b, rtol=0, atol=1e-5, what="channels_last_3d state")
    set_conv_layout(dec, False)
    assert all(p.is_contiguous() for p in dec.parameters())


def test_a_runner_refuses_to_run_after_another_relaid_the_weights(dec, z):
    a = make_video_runner(dec, VideoDecodeOptions.parse("eager"), 1, H, W)
    a.prepare()
    a.decode_frame(z[:, :, :1], True)
    make_video_runner(dec, VideoDecodeOptions.parse("eager+cl3d"), 1, H, W).prepare()  # re-allocates the conv weights
    with pytest.raises(RuntimeError, match="re-laid out"):
        a.decode_frame(z[:, :, 1:2], False)
    a.prepare()  # prepared again: runs
    assert a.decode_frame(z[:, :, 1:2], False).shape == (1, 3, 4, 64, 96)
    with pytest.raises(ValueError, match="does not fit"):
        a.decode_frame(torch.randn(1, 48, 1, H + 1, W), False)
    with pytest.raises(RuntimeError, match="prepare"):
        make_video_runner(dec, VideoDecodeOptions.parse("eager"), 1, H, W).decode_frame(z[:, :, :1], True)


def test_compiled_runner_compiles_the_residual_block_once_per_shape_and_equals_eager(dec, z):
    """Regional: one fullgraph graph per distinct residual-block shape and variant (first, steady), shared
    by every block of that shape, all compiled in prepare; decoding afterwards compiles nothing new. With
    channels_last_3d here; the contiguous layout is compiled by the pipeline test in
    tests/test_decode_pipeline.py. (The whole frame compiling as one graph, i.e. no host sync anywhere in
    it, is tests/test_vae_video.py's.)"""
    from hallolive_rt.model.vae_video_blocks import ResidualBlock

    torch._dynamo.reset()
    ref, st = _reference(dec, z)
    r = make_video_runner(dec, VideoDecodeOptions("compiled", True, **FAST_COMPILE), 1, H, W)
    r.prepare()
    blocks = [m for m in dec.decoder.modules() if isinstance(m, ResidualBlock)]
    shapes = {(m.residual[2].in_channels, m.residual[2].out_channels, m.residual[2].cache_scale) for m in blocks}
    graphs = r.compiler.graphs
    assert 2 <= graphs <= 2 * len(shapes) < 2 * len(blocks), (graphs, len(shapes), len(blocks))
    got = [r.decode_frame(z[:, :, i:i + 1], i == 0).clone() for i in range(FRAMES)]
    assert r.compiler.graphs == graphs
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, rtol=0, atol=1e-5, what=f"compiled frame {i}")
    for a, b in zip(r.state.history, st.history):
        assert_close(a, b, rtol=0, atol=1e-5, what="compiled state")
    d = r.describe()
    assert d["region"]["region"].endswith("ResidualBlock.forward") and d["region"]["compiled_graphs"] == graphs
    eager = make_video_runner(dec, VideoDecodeOptions.parse("eager"), 1, H, W)
    eager.prepare()  # a later eager runner runs the blocks eagerly again
    assert all("forward" not in m.__dict__ for m in blocks)
    set_conv_layout(dec, False)
    assert d["vae_backend"] == "compiled" and d["compile_backend"] == "aot_eager" and d["compile_s"] > 0


@pytest.mark.parametrize("spec", ["eager", "eager+cl3d"])
def test_bf16_runner_within_bound_of_fp32_eager(dec, z, spec):
    ref, _ = _reference(dec, z)
    half = copy.deepcopy(dec).to(torch.bfloat16)
    r = make_video_runner(half, VideoDecodeOptions.parse(spec), 1, H, W)
    got = _decode(r, z)
    assert r.describe()["dtype"] == "bfloat16" and got[0].dtype == torch.bfloat16
    for i, (a, b) in enumerate(zip(got, ref)):
        err = a.float() - b
        rel = (err.pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
        assert rel <= 2.5e-2 and err.abs().max().item() <= 0.06, (spec, i, rel, err.abs().max().item())


def test_variant_names_and_refusals():
    assert VideoDecodeOptions.parse("cudagraph+cl3d") == VideoDecodeOptions("cudagraph", True)
    assert VideoDecodeOptions.parse("compiled", channels_last=True).label == "compiled+cl3d"
    assert [o.label for o in VideoDecodeOptions.parse_list("eager, cudagraph,eager")] == ["eager", "cudagraph"]
    assert VideoDecodeOptions.parse("compiled-cudagraph").uses_cuda_graph and VideoDecodeOptions.parse("compiled-cudagraph").compiles
    with pytest.raises(ValueError, match="choose one of eager, compiled, cudagraph, compiled-cudagraph"):
        VideoDecodeOptions.parse("fast")
    with pytest.raises(ValueError, match="names no variant"):
        VideoDecodeOptions.parse_list(" , ")
    check_vae_options(VideoDecodeOptions.parse("compiled+cl3d"), "cpu")  # runs anywhere
    with pytest.raises(ValueError, match="captures CUDA graphs.*--vae-backend eager or compiled"):
        check_vae_options(VideoDecodeOptions.parse("cudagraph"), "cpu")


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "hallolive_rt.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_stream_flags_reach_the_metrics_and_a_cuda_graph_decoder_on_cpu_exits_2(tmp_path):
    import json

    out, metrics = tmp_path / "x.mp4", tmp_path / "m.json"
    p = _cli("stream", "--out", str(out), "--vae-backend", "cudagraph")
    assert p.returncode == 2 and "captures CUDA graphs" in p.stderr and not out.exists()
    p = _cli("stream", "--blocks", "1", "--out", str(out), "--metrics", str(metrics), "--kv-impl", "torch",
             "--vae-backend", "eager", "--vae-channels-last", "--no-overlap")
    assert p.returncode == 0, p.stderr[-3000:]
    sess = json.loads(metrics.read_text())["session"]
    assert sess["vae"]["label"] == "eager+cl3d" and sess["vae"]["vae_channels_last"] is True
    assert sess["overlap"] is False


# ---- CUDA: capture and replay against eager ------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("spec", ["cudagraph", "cudagraph+cl3d", "compiled-cudagraph"])
def test_cuda_graph_runner_replays_equal_to_eager_without_sync(spec):
    m = _tiny().cuda()
    z = torch.randn(1, 48, FRAMES, H, W, device="cuda")
    set_conv_layout(m, False)
    st = m.new_state(1, H, W)
    with torch.no_grad():
        ref = [m.decode_frame(z[:, :, i:i + 1], st, i == 0).clone() for i in range(FRAMES)]
    r = make_video_runner(m, VideoDecodeOptions.parse(spec), 1, H, W)
    r.prepare()  # warm-up and capture (may allocate and sync: outside the checked region)
    got = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # a second stream on the same graphs: the first-frame graph restarts the state
            r.reset()
            got = [r.decode_frame(z[:, :, i:i + 1], i == 0).clone() for i in range(FRAMES)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sorted(r._graphs) == [False, True]
    tol = 1e-4 if spec != "compiled-cudagraph" else 1e-3  # inductor fuses the norms (reordered sums)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, rtol=0, atol=tol, what=f"{spec} frame {i}")
    for a, b in zip(r.state.history, st.history):
        assert_close(a, b, rtol=0, atol=tol, what=f"{spec} state")


# ---- bench: variants after the baseline, in one process, recorded -------------------------------------------

def test_bench_runs_vae_variants_after_the_eager_baseline_and_both_overlap_modes(tmp_path):
    import json

    from hallolive_rt.runtime.bench import bench_main

    v = bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), None, warmup_runs=0, backends=["eager"], blocks=2, mode="vae", out_json=tmp_path / "vae.json", vae_variants=VideoDecodeOptions.parse_list("eager+cl3d"))
    disk = json.loads((tmp_path / "vae.json").read_text())
    assert list(disk["results"]) == ["eager (decoders)", "eager+cl3d (decoders)"]
    assert disk["vae_variants"] == ["eager+cl3d"]
    assert disk["ratios_metric"] == "vae_only_fps_equiv" and disk["ratios_vs_eager"]["eager (decoders)"] == 1.0
    for key, r in v["results"].items():
        assert r["session"]["vae"]["label"] == key.removesuffix(" (decoders)")
        assert r["vae_only_fps_equiv"] > 0 and r["stage_tflops"]["vae_video"]["tflops"] > 0
    e = bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), None, warmup_runs=0, compare_overlap=True, backends=["eager"], blocks=1, mode="e2e", out_json=tmp_path / "e2e.json")
    disk = json.loads((tmp_path / "e2e.json").read_text())
    assert disk["overlap"] == "both" and list(disk["results"]) == ["eager", "eager no-overlap"]
    assert [r["session"]["overlap"] for r in e["results"].values()] == [True, False]
    assert set(disk["ratios_vs_eager"]) == {"eager", "eager no-overlap"}
    with pytest.raises(ValueError, match="captures CUDA graphs"):  # refused before anything is built
        bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), None, backends=["eager"], blocks=1, mode="vae", out_json=None, vae_variants=VideoDecodeOptions.parse_list("cudagraph"))
