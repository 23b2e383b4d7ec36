"""Metrics definitions on synthetic timings; the bench on the tiny preset (CPU): JSON schema, modes,
projection labels, per-block emission (FLOP counts: tests/test_flops.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hallolive_rt.options import DiTOptions, ModelSource
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime.bench import bench_main, combine_projection
from hallolive_rt.runtime.decode_pipeline import DecodedBlock
from hallolive_rt.runtime.metrics import stream_metrics


def _blk(i, frames, start, first, done, dit, vv, va):
    return DecodedBlock(i, np.zeros((frames, 2, 2, 3), np.uint8), np.zeros(512 * 30, np.float32),
                        {"dit": dit, "vae_video": vv, "vae_audio": va}, start, first, done)


def test_metrics_definitions_on_synthetic_timings():
    # block 0: 21 frames; blocks 1..3: 24 frames, delivered 0.8 s apart
    blocks = [_blk(0, 21, 0.0, 0.30, 0.90, 400, 500, 50),
              _blk(1, 24, 0.40, 1.00, 1.70, 400, 600, 50),
              _blk(2, 24, 0.80, 1.90, 2.50, 500, 600, 50),
              _blk(3, 24, 1.30, 2.60, 3.30, 400, 700, 50)]
    m = stream_metrics(blocks, fps=25.0, text_encode_s=0.2, device="cpu", dtype="bfloat16", with_env=False)
    assert m["ttff_s"] == 0.30 and m["text_encode_s"] == 0.2
    assert m["frames"] == 93 and m["audio_samples"] == 4 * 15360
    # steady FPS: 72 frames of blocks 2..4 over done_s[3] - done_s[0] = 2.4 s
    assert m["steady_fps"] == pytest.approx(72 / 2.4) and m["steady_wall_s"] == pytest.approx(2.4)
    # block time = done - start of blocks 2..N: 1.3, 1.7, 2.0
    assert m["block_time_s"]["values"] == pytest.approx([1.3, 1.7, 2.0])
    assert m["block_time_s"]["median"] == pytest.approx(1.7)
    assert m["block_time_s"]["p95"] == pytest.approx(1.7 + 0.9 * 0.3)
    # FPS-equivalents from medians over steady blocks: DiT 400 ms, VAE 650 ms, 24 frames per block
    assert m["dit_only_fps_equiv"] == pytest.approx(24 / 0.4)
    assert m["vae_only_fps_equiv"] == pytest.approx(24 / 0.65)
    assert m["projected_two_device_fps"]["value"] == pytest.approx(24 / 0.65)
    assert "projected" in m["projected_two_device_fps"]["label"]
    # gaps between first frames: 0.7, 0.9, 0.7; p99 by linear interpolation; playback 24/25 s
    assert m["inter_block_gap_s"]["values"] == pytest.approx([0.7, 0.9, 0.7])
    assert m["inter_block_gap_s"]["p99"] == pytest.approx(0.7 + 0.98 * 0.2)
    assert m["inter_block_gap_s"]["block_playback_s"] == pytest.approx(0.96)
    assert m["inter_block_gap_s"]["real_time"] is True
    one = stream_metrics(blocks[:1], fps=25.0, with_env=False)
    assert one["steady_fps"] is None and one["block_time_s"]["median"] is None


def test_bench_tiny_cpu_json_schema_and_projection(tmp_path):
    out = {}
    for mode in ("e2e", "dit", "vae"):
        out[mode] = bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), None, warmup_runs=0, backends=["eager"], blocks=2, mode=mode, out_json=tmp_path / f"{mode}.json")
        disk = json.loads((tmp_path / f"{mode}.json").read_text())
        for k in ("command", "git_commit", "env", "shapes", "dtype", "mode", "results", "flops_per_block",
                  "projected"):
            assert k in disk, (mode, k)
        assert "projected" in disk["projected"]["label"]
    e2e = out["e2e"]["results"]["eager"]
    assert e2e["steady_fps"] > 0 and e2e["ttff_s"] > 0 and len(e2e["per_block"]) == 2
    assert e2e["stage_tflops"]["dit"]["tflops"] > 0 and e2e["stage_tflops"]["vae_video"]["tflops"] > 0
    peak = out["e2e"]["gemm_peak_measured"]  # measured in the same process, on the same device
    assert peak["tflops"] > 0 and peak["dtype"] == "float32" and peak["device"] == "cpu"
    for st in ("dit", "vae_video"):
        s = e2e["stage_tflops"][st]
        assert s["share_of_measured_peak"] == pytest.approx(s["tflops"] / peak["tflops"])
    assert out["e2e"]["projected"]["two_device_fps"] > 0
    d = out["dit"]["results"]["eager"]
    assert d["steady_fps"] is None and d["dit_only_fps_equiv"] > 0 and d["vae_only_fps_equiv"] is None
    v = out["vae"]["results"]["eager (decoders)"]
    assert v["vae_only_fps_equiv"] > 0 and v["dit_only_fps_equiv"] is None
    proj = combine_projection(tmp_path / "dit.json", tmp_path / "vae.json")
    assert proj["two_device_fps"] == pytest.approx(min(d["dit_only_fps_equiv"], v["vae_only_fps_equiv"]))


def test_bench_records_the_fast_path_choices_and_refuses_unavailable_ones(tmp_path):
    out = bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), DiTOptions(fuse_projections=True, attn_kernel="math"), warmup_runs=0, backends=["eager"], blocks=1, mode="dit", out_json=tmp_path / "f.json")
    disk = json.loads((tmp_path / "f.json").read_text())
    assert disk["dit_options"]["fuse_projections"] is True and disk["dit_options"]["attn_kernel"] == "math"
    assert disk["results"]["eager"]["session"]["fuse_projections"] is True
    assert out["results"]["eager"]["dit_only_fps_equiv"] > 0
    with pytest.raises(ValueError, match="attention kernel 'efficient' cannot run on cpu"):
        bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), DiTOptions(attn_kernel="efficient"), backends=["eager"], blocks=1, mode="dit", out_json=None)


def test_env_info_tells_a_clean_tree_from_an_unknown_one(monkeypatch):
    """git_dirty is a bool inside a checkout (False when clean) and None only where git cannot tell."""
    import subprocess

    from hallolive_rt.runtime import metrics

    def fake_run(cmd, **kw):
        out = "abc123\n" if "rev-parse" in cmd else ""  # a clean tree prints nothing for status
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(metrics.subprocess, "run", fake_run)
    env = metrics.env_info(["cpu"])
    assert env["git_commit"] == "abc123" and env["git_dirty"] is False

    monkeypatch.setattr(metrics.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 128, stdout="", stderr="not a repo"))
    env = metrics.env_info(["cpu"])
    assert env["git_commit"] is None and env["git_dirty"] is None


def test_bench_emits_each_block_as_it_finishes_and_reuses_components(tmp_path):
    """on_update / out_json see every timed block as soon as it ends (a kill loses only the block in flight);
    one set of components serves the dit and vae modes (the GPU session builds the model once)."""
    from hallolive_rt.runtime.components import load_components

    comps = load_components(load_profile("tiny"), dit_device="cpu", seed=0, with_text=False)
    for mode, name in (("dit", "eager"), ("vae", "eager (decoders)")):
        seen = []

        def on_update(o):
            on_disk = json.loads((tmp_path / f"{mode}.json").read_text()) if seen else None
            seen.append((o["complete"], len(o["results"][name]["per_block"]), on_disk is None or
                         len(on_disk["results"][name]["per_block"]) == len(seen)))

        out = bench_main(ModelSource(preset="tiny", random_weights=True, device="cpu"), None, warmup_runs=0, components=comps, on_update=on_update, backends=["eager"], blocks=3, mode=mode, out_json=tmp_path / f"{mode}.json")
        assert [s[:2] for s in seen] == [(False, 1), (False, 2), (False, 3), (True, 3)], mode
        assert all(s[2] for s in seen), "the file on disk holds the previous block's numbers at each update"
        assert out["build_s"] is None and out["flops"]["source"].startswith("committed table tiny.json")
        disk = json.loads((tmp_path / f"{mode}.json").read_text())
        assert disk["complete"] is True and len(disk["results"][name]["per_block"]) == 3


def test_gemm_peak_is_the_best_of_timed_square_matmuls():
    from hallolive_rt.runtime.peak import measure_gemm_peak

    r = measure_gemm_peak("cpu", torch.float32, n=128, iters=3, warmup=1)
    assert r["n"] == 128 and r["iters"] == 3 and r["best_s"] > 0
    assert r["tflops"] == pytest.approx(2 * 128**3 / r["best_s"] / 1e12)
