"""``--video-decoder``: the tiny preview decoders run through the same session, pipeline, CLI, bench and
server path as the full decoder; a stream's frames are the tiny decoder's whole-clip decode of the very
latents the DiT committed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hallolive_rt.cli import app
from hallolive_rt.errors import InputError
from hallolive_rt.options import DecoderOptions, ModelSource, OutputOptions, VideoDecodeOptions
from tests.tiny_reference import released_shapes, random_state_dict


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("taew") / "taew2_2.pth"
    torch.save(random_state_dict(released_shapes(), seed=3), p)
    return p


@pytest.mark.parametrize("variant,runner", [("taew2_2", "eager"), ("lighttaew2_2", "eager"), ("taew2_2", "compiled")])
def test_stream_frames_are_the_tiny_decoders_whole_clip_decode(tiny_profile, tiny_file, variant, runner):
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.decode_pipeline import frames_to_uint8
    from hallolive_rt.runtime.session import StreamSession

    dec = DecoderOptions(video_decoder=variant, tiny_weights=str(tiny_file),
                         runner=VideoDecodeOptions(runner, compile_backend="aot_eager"))
    comps = load_components(tiny_profile, None, with_text=False, decoders=dec)
    assert type(comps.video_decoder).__name__ == "TinyVideoDecoder" and comps.video_decoder.variant == variant
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    latents = []
    sess = StreamSession(comps, tiny_profile, decoders=dec)
    got = list(sess.run(ctx, seed=1, on_latents=lambda i, out: latents.append(out.video.clone())))
    assert sess.describe()["video_decoder"] == variant
    if runner == "compiled":  # the MemBlock compiled once per shape and variant, shared by its 9 blocks
        assert 2 <= sess.pipeline.vrunner.compiler.graphs < 2 * 9
    comps.video_decoder.set_region_fn(None)
    z = torch.cat(latents, dim=1).transpose(1, 2)  # [1, 48, T, h, w]
    with torch.no_grad():
        whole = frames_to_uint8(comps.video_decoder.decode_full(z)[0]).numpy()
    frames = np.concatenate([b.frames for b in got])
    assert frames.shape == whole.shape and np.array_equal(frames, whole)


def test_bench_and_server_take_the_tiny_decoder(tiny_profile, tmp_path):
    from hallolive_rt.runtime.bench import bench_main
    from hallolive_rt.runtime.serve.launch import build_server

    dec = DecoderOptions(video_decoder="taew2_2")
    out = bench_main(ModelSource("tiny", random_weights=True), None, dec, backends=["eager"], blocks=2, mode="vae",
                     out_json=tmp_path / "v.json", warmup_runs=0)
    assert out["video_decoder"] == "taew2_2" and "taew2_2" in out["weights"]
    assert out["results"]["eager (decoders)"]["vae_only_fps_equiv"] > 0
    server = build_server(decoders=dec)
    assert server.session_options["decoders"].video_decoder == "taew2_2"
    assert type(server.c.video_decoder).__name__ == "TinyVideoDecoder"


def test_cli_refusals_name_the_flag(tmp_path, tiny_file):
    r = CliRunner().invoke(app, ["stream", "--video-decoder", "taew2_2", "--vae-channels-last", "--out",
                                 str(tmp_path / "o.mp4")])
    assert r.exit_code == 2 and "--vae-channels-last" in r.output and "2-D convs" in r.output
    r = CliRunner().invoke(app, ["stream", "--video-decoder", "lighttaew2_2", "--tiny-decoder-weights",
                                 str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o.mp4")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = CliRunner().invoke(app, ["stream", "--tiny-decoder-weights", str(tiny_file), "--out", str(tmp_path / "o.mp4")])
    assert r.exit_code == 2 and "goes with --video-decoder taew2_2 or lighttaew2_2" in r.output
    assert not (tmp_path / "o.mp4").exists()


def test_stream_main_writes_with_the_tiny_decoder(tmp_path, tiny_file):
    from hallolive_rt.runtime.stream_run import stream_main

    s = stream_main("hi", decoders=DecoderOptions(video_decoder="taew2_2", tiny_weights=str(tiny_file),
                                                  runner=VideoDecodeOptions("compiled", compile_backend="aot_eager")),
                    outputs=OutputOptions(out=str(tmp_path / "o.mp4")), progress=False)
    assert s["frames_generated"] == 21 and s["session"]["video_decoder"] == "taew2_2"
    with pytest.raises(InputError, match="needs its weights"):
        stream_main("hi", model=ModelSource("hallolive-512x992", model_dir=str(tmp_path)),
                    decoders=DecoderOptions(video_decoder="taew2_2"), progress=False)
