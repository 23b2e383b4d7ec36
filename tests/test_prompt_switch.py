"""Prompt switching in the library (StreamSession.switch_prompt) and from the CLI (--prompt-at), tiny
preset on CPU: blocks before the switch are bit-identical to a run without it, the caches of those blocks
are untouched, the text K/V after it are a fresh prepare_text of the new prompt, the blocks after differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hallolive_rt.options import DecoderOptions, DiTOptions, OutputOptions
from hallolive_rt.model.text_tokenizer import PromptError
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime.components import load_components
from hallolive_rt.runtime.session import StreamSession, parse_prompt_at
from hallolive_rt.runtime.stream_run import stream_main
from hallolive_rt.state import DiTState

TEXT_KV = ("text_k_video", "text_v_video", "text_k_audio", "text_v_audio")
CACHES = ("video_k", "video_v", "fusion_k", "fusion_v")


@pytest.fixture(scope="module")
def comps():
    return load_components(load_profile("tiny"), seed=0)


@pytest.fixture(scope="module")
def ctxs():
    g = torch.Generator().manual_seed(11)
    return 0.5 * torch.randn(1, 512, 64, generator=g), 0.5 * torch.randn(1, 512, 64, generator=g)


def _run(sess, ctx, switch_to=None, at=2):
    """Blocks of one stream; with a switch, the caches and text K/V at the boundary (after prepare_text)."""
    seen = {}

    def snapshot(block):
        seen["block"] = block
        seen["state"] = {k: t.clone() for k, t in sess.bs.state.tensors().items()}

    if switch_to is not None:
        sess.switch_prompt(switch_to, at_block=at, on_applied=snapshot)
    blocks = [(b.index, b.frames.copy(), b.audio.copy()) for b in sess.run(ctx, seed=4)]
    return blocks, seen


def test_switch_keeps_earlier_blocks_and_caches_and_uses_fresh_text_kv(comps, ctxs):
    a, b = ctxs
    sess = StreamSession(comps, comps.profile, decoders=DecoderOptions(overlap=False))  # 3 blocks (the tiny clip), append caches
    base, _ = _run(sess, a)
    same, at_same = _run(sess, a, switch_to=a)  # switching to the same prompt changes nothing
    new, at_new = _run(sess, a, switch_to=b)
    assert sess.describe()["prompt_switches"] == [2]
    assert at_new["block"] == at_same["block"] == 2
    for (i, f0, a0), (_, f1, a1), (_, f2, a2) in zip(base, same, new):
        assert np.array_equal(f0, f1) and np.array_equal(a0, a1), f"block {i}: a no-op switch changed it"
        if i < 2:
            assert np.array_equal(f0, f2) and np.array_equal(a0, a2), f"block {i} (before the switch) differs"
        else:
            assert not np.array_equal(f0, f2) and not np.array_equal(a0, a2), f"block {i} ignored the new prompt"
    # at the boundary: the caches of blocks 0-1 are exactly those of the run without a switch ...
    for k in CACHES:
        assert torch.equal(at_new["state"][k], at_same["state"][k]), f"{k} changed by the switch"
    # ... and the text K/V of both streams are a fresh prepare_text of the new prompt
    fresh = DiTState.allocate(comps.cfg, comps.profile, sess.bs.state.layout, device="cpu", dtype=comps.dtype)
    with torch.no_grad():
        comps.dit.prepare_text(b, fresh)
    for k in TEXT_KV:
        assert torch.equal(at_new["state"][k], getattr(fresh, k)), k
        assert not torch.equal(at_same["state"][k], getattr(fresh, k)), k


def test_text_switch_needs_the_resident_encoder_and_a_valid_prompt():
    c = load_components(load_profile("tiny"), seed=0)
    sess = StreamSession(c, c.profile, decoders=DecoderOptions(overlap=False), blocks=2, keep_text_encoder=True)
    ctx, _ = sess.encode("a first prompt")
    assert c.text_encoder is not None  # kept: the session may still switch by text
    with pytest.raises(PromptError):
        sess.switch_prompt("")
    with pytest.raises(PromptError, match="too long"):
        sess.switch_prompt("word " * 2000)
    with pytest.raises(ValueError):
        sess.switch_prompt("x", at_block=-1)
    applied = []
    sess.switch_prompt("a second prompt", at_block=1, on_applied=applied.append)
    got = [blk.index for blk in sess.run(ctx, seed=0)]
    assert got == [0, 1] and applied == [1]
    # the same text, encoded up front, gives the same text K/V as the switch encoded at the boundary
    state = {k: getattr(sess.bs.state, k).clone() for k in TEXT_KV}
    ctx2, _ = sess.encode("a second prompt")
    fresh = DiTState.allocate(c.cfg, c.profile, sess.bs.state.layout, device="cpu", dtype=c.dtype)
    with torch.no_grad():
        c.dit.prepare_text(ctx2, fresh)
    for k in TEXT_KV:
        assert torch.equal(state[k], getattr(fresh, k)), k
    # a stop asked for between runs does not end the next one; a stop during a run ends it after its block
    sess.request_stop()
    it = sess.run(ctx, seed=0)
    first = next(it)
    sess.request_stop()
    assert first.index == 0 and [blk.index for blk in it] == []
    sess.clear()
    assert all(not t.any() for t in sess.bs.state.tensors().values())
    ctx3, _ = StreamSession(c, c.profile, decoders=DecoderOptions(overlap=False), blocks=1).encode("released now")
    assert c.text_encoder is None
    with pytest.raises(RuntimeError, match="keep_text_encoder"):
        sess.switch_prompt("too late")
    sess.switch_prompt(ctx3)  # an encoded context needs no encoder


def test_parse_prompt_at():
    assert parse_prompt_at("3:A man: hi") == (3, "A man: hi")
    for bad in ("x:A", "A", ":A", "-1:A"):
        with pytest.raises(ValueError, match="BLOCK:PROMPT"):
            parse_prompt_at(bad)


def test_stream_main_prompt_at(tmp_path):
    kw = dict(blocks=3, dit=DiTOptions(kv_impl="torch"), decoders=DecoderOptions(overlap=False), progress=False)
    plain = stream_main("first words", outputs=OutputOptions(out=None, frames_out=str(tmp_path / "a.y4m")), **kw)
    switched = stream_main("first words", outputs=OutputOptions(out=None, frames_out=str(tmp_path / "b.y4m")), prompt_at=[(2, "other words")], **kw)
    assert plain["session"]["prompt_switches"] == [] and switched["session"]["prompt_switches"] == [2]
    a, b = (tmp_path / "a.y4m").read_bytes(), (tmp_path / "b.y4m").read_bytes()
    # y4m: header line, then one FRAME record per frame (64x96 4:4:4); blocks 0-1 are 5 + 8 frames
    header = a.index(b"\n") + 1
    rec = len(b"FRAME\n") + 3 * 64 * 96
    cut = header + 13 * rec
    assert len(a) == len(b) == header + 21 * rec
    assert a[:cut] == b[:cut] and a[cut:] != b[cut:]


@pytest.mark.parametrize("args,needle", [
    (["--prompt-at", "two:B"], "BLOCK:PROMPT"),
    (["--prompt-at", "3:B", "--blocks", "3"], "--prompt-at 3"),
    (["--prompt-at", "0:B"], "--prompt-at 0"),
    (["--prompt-at", "1:"], "--prompt-at 1"),
])
def test_cli_prompt_at_bad_input_exits_2(tmp_path, args, needle):
    from typer.testing import CliRunner

    from hallolive_rt.cli import app

    out = tmp_path / "x.mp4"
    res = CliRunner().invoke(app, ["stream", "--out", str(out), *args])
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:])
    assert needle in res.output
    assert not out.exists()
