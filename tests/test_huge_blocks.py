"""A stream's length never scales the work before (or per) block: a billion blocks start as fast as three,
through the library and through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from hallolive_rt.cache_policy import choose_policy, variant_plans
from hallolive_rt.profile import load_profile

HUGE = 10**12


def test_variant_plans_are_bounded_whatever_the_length():
    p = load_profile("tiny")
    t = time.perf_counter()
    finite, endless = variant_plans(choose_policy(p, HUGE)), variant_plans(choose_policy(p, None))
    assert time.perf_counter() - t < 0.5
    assert [x.variant for x in finite] == [x.variant for x in endless]


def test_a_session_of_a_trillion_blocks_reaches_its_first_block_at_once(tiny_profile):
    from hallolive_rt.options import DecoderOptions
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.session import StreamSession

    comps = load_components(tiny_profile, None, with_text=False)
    ctx = 0.5 * torch.randn(1, 512, tiny_profile.text.text_dim)
    t = time.perf_counter()
    sess = StreamSession(comps, tiny_profile, blocks=HUGE, decoders=DecoderOptions(overlap=False))
    blocks = sess.run(ctx, seed=0)
    first = next(blocks)
    blocks.close()
    assert first.index == 0 and sess.describe()["blocks"] == HUGE and sess.policy.name == "rolling"
    assert time.perf_counter() - t < 60  # seconds of a three-block stream on two cores, not hours


def test_the_cli_streams_a_billion_blocks_from_the_start(tmp_path):
    out = tmp_path / "o.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "hallolive_rt.cli", "stream", "--blocks", "1000000000", "--out",
                             str(out), "--no-overlap"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        t, seen = time.monotonic(), []
        while time.monotonic() - t < 120:
            line = proc.stderr.readline()
            seen.append(line)
            if "block 1:" in line:  # block 0 and block 1 done: written, well before any bound
                break
        assert any("block 0:" in s for s in seen), "".join(seen)[-2000:]
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-2000:]
    assert "the file is complete and playable" in rest and out.stat().st_size > 0
