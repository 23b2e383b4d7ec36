"""FLOP counts: the committed tables (runtime/flops/<preset>.json) are fresh and equal a count on the meta
device; the full-size counts agree with docs/FACTS.md section 7; a stale table is never used silently."""

from __future__ import annotations

import json

import pytest

from hallolive_rt.cache_policy import AppendPolicy, choose_policy
from hallolive_rt.profile import list_profiles, load_profile
from hallolive_rt.runtime import flops
from hallolive_rt.runtime.flops import FlopCounts, count_flops, flops_key, table_path


@pytest.mark.parametrize("preset", list_profiles())
def test_committed_table_is_fresh(preset):
    p = load_profile(preset)
    path = table_path(p)
    assert path.is_file(), f"no FLOP table for {preset}: run `python -m hallolive_rt.runtime.flops --preset {preset}`"
    table = json.loads(path.read_text())
    assert table["key"] == flops_key(p), (f"{path} is stale: run `{table['command']}` and commit it")
    fc = FlopCounts(p)
    count_flops(p, list(choose_policy(p, p.stream.blocks).plans()), len(p.stream.denoising_steps), fc)
    assert fc.describe() == {"source": f"committed table {path.name} (key {table['key']})",
                             "counted_missing_entries": []}, "the table must cover the profile's own stream"


def test_tiny_table_equals_a_fresh_count():
    p = load_profile("tiny")
    table = json.loads(table_path(p).read_text())
    fresh = FlopCounts(p, use_table=False)
    for key, value in table["dit_forward"].items():
        audio_len, kv_len = map(int, key.split(","))
        assert flops._dit_forward_flops(p, audio_len, kv_len) == value, key
    assert table["vae_frame"] == {"first": fresh.vae_frame(True), "next": fresh.vae_frame(False)}
    assert {k: fresh.audio_window(int(k)) for k in table["audio_window"]} == table["audio_window"]


def test_full_size_counts_match_facts_and_a_fresh_count():
    """docs/FACTS.md section 7: DiT forward 33.5 -> 48.8 TFLOP (cache grows); VAE ~37 TFLOP per latent frame."""
    p = load_profile("hallolive-512x992")
    plans = list(AppendPolicy(p).plans())
    fc = FlopCounts(p)
    first, last = fc.dit_forward(plans[0]) / 1e12, fc.dit_forward(plans[-1]) / 1e12
    assert first == pytest.approx(33.5, abs=0.1) and last == pytest.approx(48.8, abs=0.1)
    per_frame = fc.vae_video_block(first_block=False) / p.stream.latent_frames_per_block / 1e12
    assert per_frame == pytest.approx(37.0, rel=0.03)
    # the table holds what the meta device counts today (the largest DiT shape and a VAE frame)
    assert fc.dit_forward(plans[-1]) == flops._dit_forward_flops(p, plans[-1].audio_len, plans[-1].video_kv_len)
    assert fc.vae_frame(False) == flops._vae_frame_flops(p, False)


def test_stale_or_missing_table_is_counted_with_a_message(tmp_path, monkeypatch, capsys):
    p = load_profile("tiny")
    good = json.loads(table_path(p).read_text())
    monkeypatch.setattr(flops, "FLOPS_DIR", tmp_path)
    fc = FlopCounts(p)
    assert fc.table is None and fc.source.startswith("no committed table")
    (tmp_path / "tiny.json").write_text(json.dumps({**good, "key": "0" * 16, "vae_frame": {"first": 1, "next": 1}}))
    fc = FlopCounts(p)
    assert fc.table is None and "stale" in fc.source
    assert "python -m hallolive_rt.runtime.flops --preset tiny" in capsys.readouterr().err
    assert fc.vae_frame(False) == good["vae_frame"]["next"], "a stale table's numbers are never used"
    # a fresh table lacking an entry: that entry is counted, and said so
    partial = {**good, "audio_window": {}}
    (tmp_path / "tiny.json").write_text(json.dumps(partial))
    fc = FlopCounts(p)
    assert fc.vae_audio_block(0) == good["audio_window"][min(good["audio_window"], key=int)]
    assert fc.describe()["counted_missing_entries"] == [f"audio_window[{min(good['audio_window'], key=int)}]"]
