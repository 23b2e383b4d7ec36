"""Streams longer than the released clip, from the command line's own entry point: the block count goes to
the session (never into the profile), so past the clip the rolling policy holds memory and block time flat,
and every length - endless included - allocates the same state."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from hallolive_rt.options import DecoderOptions, DiTOptions, OutputOptions
from hallolive_rt.cache_policy import ENDLESS, AppendPolicy, RollingPolicy, choose_policy, parse_blocks
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime.components import load_components
from hallolive_rt.errors import InputError
from hallolive_rt.runtime.session import StreamSession
from hallolive_rt.runtime.stream_run import stream_main
from hallolive_rt.state import DiTState


def test_stream_main_past_the_clip_rolls_in_flat_memory_and_time(tmp_path, tiny_profile):
    clip = tiny_profile.stream.blocks
    n = 16  # > 5x the tiny clip: the released append policy would grow every block
    m = tmp_path / "m.json"
    summary = stream_main("a long talk", dit=DiTOptions(kv_impl="torch"), decoders=DecoderOptions(overlap=False), outputs=OutputOptions(out=str(tmp_path / "o.mp4"), metrics=str(m)), blocks=n, progress=False)
    metrics = json.loads(m.read_text())
    sess = metrics["session"]
    assert summary["blocks"] == n and sess["blocks"] == n > clip
    assert sess["policy"] == "rolling"
    # the state of this 16-block stream is the state of a one-block stream (and of the released clip)
    one = stream_main("a long talk", dit=DiTOptions(kv_impl="torch"), decoders=DecoderOptions(overlap=False), outputs=OutputOptions(out=str(tmp_path / "p.mp4")), blocks=1, progress=False)
    assert sess["state_bytes"] == one["session"]["state_bytes"]
    # flat block time: the fastest of five blocks (the least disturbed by other processes on a shared
    # machine) early in the stream and at its end; the append policy's attention grows with every block
    dit_ms = [b["stage_ms"]["dit"] for b in metrics["per_block"]]
    early, late = min(dit_ms[4:9]), min(dit_ms[n - 5:])
    print(f"tiny {n}-block stream: state {sess['state_bytes']} B, fastest DiT block {early:.1f} ms (blocks 4-8) "
          f"vs {late:.1f} ms (last 5)")
    assert late < 1.5 * early + 10.0, (early, late)


def test_every_length_allocates_the_same_state_at_full_size():
    """Layouts (hence DiTState bytes) of the full-size preset for 1, the clip, 6, 60, 10**9 blocks and endless:
    one size, never a function of the length asked for (10**9 blocks once asked for 12.3 TB)."""
    from hallolive_rt.config import load_fusion_config

    p = load_profile("hallolive-512x992")
    cfg = load_fusion_config(p.video_config, p.audio_config)
    sizes = {}
    for n in (1, p.stream.blocks, p.stream.blocks + 1, 60, 10**9, None):
        pol = choose_policy(p, n)
        assert isinstance(pol, AppendPolicy if n is not None and n <= p.stream.blocks else RollingPolicy)
        st = DiTState.allocate(cfg, p, pol.layout(), device="meta", dtype=p.dtype)
        sizes[n] = st.nbytes()
    assert len(set(sizes.values())) == 1, sizes
    assert next(iter(sizes.values())) < 16 * 2**30  # ~10 GiB of caches, as the released clip holds


def test_an_endless_session_streams_until_the_caller_stops(tiny_profile):
    comps = load_components(tiny_profile, seed=0)
    sess = StreamSession(comps, tiny_profile, decoders=DecoderOptions(overlap=True), blocks=ENDLESS)
    finite = StreamSession(comps, tiny_profile, decoders=DecoderOptions(overlap=False), blocks=2)
    assert sess.blocks is None and sess.describe()["blocks"] == ENDLESS and sess.policy.name == "rolling"
    assert sess.describe()["state_bytes"] == finite.describe()["state_bytes"]
    ctx, _ = sess.encode("no end", release=False)
    n = 3 * tiny_profile.stream.blocks + 1
    gen = sess.run(ctx, seed=0)
    got = list(itertools.islice(gen, n))
    gen.close()  # the caller stops: the decode threads end with the generator
    assert [b.index for b in got] == list(range(n))
    assert all(b.frames.shape[0] > 0 and torch.isfinite(torch.from_numpy(b.audio)).all() for b in got)
    assert not sess.pipeline._threads


@pytest.mark.parametrize("value,want", [(1, 1), ("7", 7), ("endless", None), (" Endless ", None)])
def test_parse_blocks(value, want):
    assert parse_blocks(value) == want


@pytest.mark.parametrize("value", [0, -1, "0", "many", "", None, True, 2.5])
def test_parse_blocks_refuses(value):
    with pytest.raises(ValueError, match="--blocks must be a whole number >= 1 or 'endless'"):
        parse_blocks(value)


def test_append_is_refused_past_the_clip_before_anything_loads(tmp_path):
    for blocks in (4, "endless"):
        with pytest.raises(InputError, match="append holds at most 3 blocks"):
            stream_main("x", dit=DiTOptions(cache_policy="append"), outputs=OutputOptions(out=str(tmp_path / "o.mp4")), blocks=blocks, progress=False)
    assert not (tmp_path / "o.mp4").exists()
