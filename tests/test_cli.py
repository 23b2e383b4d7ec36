"""`hallolive-rt` as a user runs it: the demo MP4 for 3 and 8 blocks, exit codes on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest

pytest.importorskip("av", reason="`hallolive-rt stream` writes MP4 through PyAV, which is not installed")

from hallolive_rt.runtime.media import probe_media  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hallolive_rt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_help_lists_the_commands():
    p = _cli("--help")
    assert p.returncode == 0
    for cmd in ("stream", "export", "bench", "profile"):
        assert cmd in p.stdout


@pytest.mark.parametrize("blocks,kv", [(3, "ext"), (8, "torch")])
def test_demo_mp4_has_h264_and_16k_aac_of_matching_duration(tmp_path, blocks, kv):
    out = tmp_path / "demo.mp4"
    p = _cli("stream", "--blocks", str(blocks), "--out", str(out), "--kv-impl", kv)
    assert p.returncode == 0, p.stderr[-3000:]
    info = probe_media(out)
    assert info["error"] is None
    (v,), (a,) = info["video"], info["audio"]
    assert v["codec"] == "h264" and a["codec"] == "aac" and a["sample_rate"] == 16000
    # tiny preset: 1 + 4 frames for the first block, 8 per later block, + the 3 frames held at the end so
    # the picture lasts as long as the audio (the first latent frame gives 1 frame for 5 audio tokens)
    generated = 5 + 8 * (blocks - 1)
    assert v["frames"] == generated + 3
    assert v["fps"] == Fraction(25)
    assert abs(a["duration_s"] - v["duration_s"]) < 1 / 25, (a["duration_s"], v["duration_s"])
    # all generated audio is there; the container also counts AAC's 1024-sample encoder priming (64 ms)
    assert abs(a["duration_s"] - (blocks * 10 * 512 + 1024) / 16000) < 1 / 25


@pytest.mark.parametrize("args,needle", [
    (["--blocks", "0"], "--blocks"),
    (["--preset", "nope"], "unknown preset"),
    (["--out", "/nonexistent-dir/x.mp4"], "does not exist"),
    (["--prompt", ""], "empty"),
    (["--model-dir", "/tmp", "--random-weights"], "exclude each other"),
    (["--attn-kernel", "fastest"], "--attn-kernel"),
    (["--attn-kernel", "cudnn"], "attention kernel 'cudnn' cannot run on cpu"),
])
def test_bad_input_exits_2_with_a_message_and_no_output(tmp_path, args, needle):
    out = tmp_path / "x.mp4"
    full = ["stream", *args] if "--out" in args else ["stream", "--out", str(out), *args]
    p = _cli(*full, timeout=120)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert needle in (p.stderr + p.stdout)
    assert not out.exists()


def test_fast_path_flags_reach_the_session_and_the_metrics(tmp_path):
    out, metrics = tmp_path / "x.mp4", tmp_path / "m.json"
    p = _cli("stream", "--blocks", "1", "--out", str(out), "--metrics", str(metrics), "--kv-impl", "torch",
             "--fuse-projections", "--attn-kernel", "math")
    assert p.returncode == 0, p.stderr[-3000:]
    sess = json.loads(metrics.read_text())["session"]
    assert sess["fuse_projections"] is True and sess["attn_kernel"] == "math"


def test_corrupted_checkpoints_name_the_file(tmp_path):
    from hallolive_rt.profile import load_profile
    from hallolive_rt.runtime.components import MODEL_FILES, load_components
    from hallolive_rt.weights import CheckpointError

    root = tmp_path / "models"
    for name in MODEL_FILES.names():
        rel = getattr(MODEL_FILES, name)
        f = root / rel
        if rel.endswith("/"):  # the tokenizer folder
            f.mkdir(parents=True, exist_ok=True)
            (f / "tokenizer.json").write_text("{}")
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"\x00partial download\x00" * 10)
    with pytest.raises(CheckpointError) as e:
        load_components(load_profile("hallolive-512x992"), root, dit_device="cpu", with_text=False)
    assert str(root) in str(e.value) and "not a PyTorch checkpoint" in str(e.value)


def test_export_tiny_needs_no_weights_flag_and_full_size_asks_for_one(tmp_path):
    p = _cli("export", "--submodels", "text", "--out-dir", str(tmp_path / "art"))
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["weights"] == {"text": "random:0"} and m["weights_files"]["text"]["file"] == "text_tiny_fp32.weights"
    p = _cli("export", "--preset", "hallolive-512x992", "--out-dir", str(tmp_path / "full"))
    assert p.returncode == 2 and "needs weights: pass --model-dir <official download> or --random-weights" in p.stderr
    assert not (tmp_path / "full").exists()
