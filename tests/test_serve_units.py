"""The pieces of live sessions that need no server: the in-memory fMP4 sink (the same bytes as the file),
message validation, the MSE type, the bind rules and the `serve` command's refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("av")  # the fragment sink muxes with PyAV (absent on the GPU image: skip, not an error)

from hallolive_rt.cli import app  # noqa: E402
from hallolive_rt.runtime.media import FragmentSink, MediaError, StreamWriter  # noqa: E402
from hallolive_rt.runtime.serve import launch  # noqa: E402
from hallolive_rt.runtime.serve.protocol import (MAX_BLOCKS, PROTOCOL_VERSION, Ack, Limits, Prompt,  # noqa: E402
                                                 ProtocolError, Start, Stop, event, mse_mime, parse_message)


def _boxes(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        out.append(kind)
        i += size
    assert i == len(data), "segment does not end on a box boundary"
    return out


def _blocks(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 255, (5 if i == 0 else 8, 64, 96, 3), dtype=np.uint8),
             (0.2 * rng.standard_normal(5120)).astype(np.float32)) for i in range(n)]


def test_sink_segments_are_the_file_byte_for_byte(tmp_path):
    kw = dict(width=96, height=64, fps=25, sample_rate=16000)
    blocks = _blocks()
    with StreamWriter(tmp_path / "a.mp4", **kw) as w:
        for f, a in blocks:
            w.write_block(f, a)
    sink = FragmentSink()
    segs = []
    with StreamWriter(None, sink=sink, **kw) as w:
        for f, a in blocks:
            w.write_block(f, a)
            segs += sink.pop()
    segs += sink.pop()  # the tail close() wrote
    assert [(s.kind, s.block) for s in segs] == [("init", None), ("fragment", 0), ("fragment", 1),
                                                 ("fragment", 2), ("tail", None)]
    assert b"".join(s.data for s in segs) == (tmp_path / "a.mp4").read_bytes()
    assert sink.bytes_written == sum(len(s.data) for s in segs)
    # MSE needs exactly this shape: an init segment, then self-contained moof + mdat pairs
    assert _boxes(segs[0].data) == [b"ftyp", b"moov"]
    assert all(_boxes(s.data) == [b"moof", b"mdat"] for s in segs[1:4])
    assert _boxes(segs[4].data)[:2] == [b"moof", b"mdat"]  # held frames + tail audio (+ mfra)
    assert mse_mime(segs[0].data).startswith('video/mp4; codecs="avc1.64')  # x264 High profile
    with pytest.raises(MediaError, match="not both"):
        StreamWriter(tmp_path / "b.mp4", sink=FragmentSink(), **kw)


def test_mse_mime_needs_an_avcc_box():
    with pytest.raises(ValueError, match="avcC"):
        mse_mime(b"\x00\x00\x00\x08ftyp")


@pytest.mark.parametrize("raw,code,fatal", [
    (b"{}", "bad_message", False),
    ("nope", "bad_json", False),
    ('"start"', "bad_message", False),
    ('{"type": "begin"}', "bad_type", False),
    ('{"type": "stop", "now": true}', "bad_field", False),
    ('{"type": "start", "prompt": 5}', "bad_field", False),
    ('{"type": "start", "prompt": "a\\u0000b"}', "bad_prompt", False),
    ('{"type": "start", "prompt": "hi", "blocks": 101}', "bad_field", False),
    ('{"type": "start", "prompt": "hi", "future_audio_frames": 31}', "bad_field", False),
    ('{"type": "start", "prompt": "hi", "seed": -1}', "bad_field", False),
    ('{"type": "ack"}', "bad_field", False),
    ('{"type": "ack", "block": 1.5}', "bad_field", False),
    ('{"type": "ack", "block": 9007199254740992}', "bad_field", False),  # MAX_BLOCKS + 1
    ('{"type": "start", "prompt": "hi \\ud800"}', "bad_prompt", False),  # valid JSON, a lone surrogate
    ('{"type": "prompt", "prompt": "\\udfff tail"}', "bad_prompt", False),
    ('{"type": ["start"]}', "bad_type", False),  # an unhashable type
    ('{"type": {}}', "bad_type", False),
    ('{"type": "stop", "v": 2}', "bad_version", True),
    ('{"type": "prompt", "prompt": "' + "y" * 300 + '"}', "too_large", True),
])
def test_parse_message_refuses(raw, code, fatal):
    limits = Limits(max_message_bytes=256, max_blocks=100)
    with pytest.raises(ProtocolError) as e:
        parse_message(raw, limits)
    assert e.value.code == code and e.value.fatal is fatal and str(e.value)


def test_parse_message_accepts():
    lim = Limits()
    assert parse_message('{"type": "start", "prompt": "hi"}', lim) == Start("hi", 0, None, None)
    assert parse_message(json.dumps({"type": "start", "v": 1, "prompt": "hi", "seed": 7, "blocks": None,
                                     "future_audio_frames": 5}), lim) == Start("hi", 7, None, 5)
    assert parse_message('{"type": "prompt", "prompt": "next"}', lim) == Prompt("next")
    assert parse_message('{"type": "ack", "block": 3}', lim) == Ack(3)
    assert parse_message('{"type": "stop"}', lim) == Stop()
    huge = parse_message('{"type": "start", "prompt": "hi \\ud83d\\ude00", "blocks": 9007199254740991}', lim)
    assert huge == Start("hi \U0001F600", 0, MAX_BLOCKS, None)  # a surrogate pair is one character
    with pytest.raises(ProtocolError, match="9007199254740991"):  # no limit set: MAX_BLOCKS still bounds
        parse_message('{"type": "start", "prompt": "hi", "blocks": 9007199254740992}', lim)
    with pytest.raises(ProtocolError) as e:  # nested deeper than the parser recurses, within 16 KiB
        parse_message("[" * 3000 + "]" * 3000, lim)
    assert e.value.code == "bad_json" and not e.value.fatal
    assert event("end", reason="done") == {"type": "end", "v": PROTOCOL_VERSION, "reason": "done"}


def test_bind_rules():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert launch.is_loopback(host)
        launch.check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.org"):
        assert not launch.is_loopback(host)
        with pytest.raises(launch.InputError, match="--token"):
            launch.check_bind(host, None)
        launch.check_bind(host, "long-enough-token")
    with pytest.raises(launch.InputError, match="8 characters"):
        launch.check_bind("0.0.0.0", "short")


def test_serve_refuses_an_open_bind_without_a_token(monkeypatch):
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)
    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token" in res.output


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(launch, "missing_serve_deps", lambda: ["fastapi", "uvicorn"])
    res = CliRunner().invoke(app, ["serve"])
    assert res.exit_code == 3 and "pip install -e '.[serve]'" in res.output


def test_serve_bad_options_exit_2_before_loading():
    res = CliRunner().invoke(app, ["serve", "--preset", "nope"])
    assert res.exit_code == 2 and "unknown preset" in res.output
    res = CliRunner().invoke(app, ["serve", "--preset", "hallolive-512x992"])
    assert res.exit_code == 2 and "needs weights" in res.output


def test_ice_server_specs_are_checked_before_anything_loads():
    from hallolive_rt.options import ice_server

    assert ice_server("stun:stun.example.org:3478") == ("stun:stun.example.org:3478", None, None)
    assert ice_server("u:p@ss@turn:turn.example.org:3478?transport=udp") == \
        ("turn:turn.example.org:3478?transport=udp", "u", "p@ss")
    for spec, why in [("http://x", "scheme"), ("stun:", "scheme"), ("turn:t.example.org", "USER:CREDENTIAL"),
                      ("u:p@stun:s.example.org", "takes no credentials"), ("u@turns:t.example.org", "USER:CRED")]:
        with pytest.raises(launch.InputError, match=why):
            ice_server(spec)
    res = CliRunner().invoke(app, ["serve", "--ice-server", "stun:s.example.org"])
    assert res.exit_code == 2 and "add --webrtc" in res.output
    res = CliRunner().invoke(app, ["serve", "--webrtc", "--ice-server", "turn:t.example.org"])
    assert res.exit_code == 2 and "needs USER:CREDENTIAL@" in res.output
    res = CliRunner().invoke(app, ["serve", "--webrtc", "--ray"])
    assert res.exit_code == 2 and "one process" in res.output


def test_serve_webrtc_without_aiortc_says_how_to_install_it(monkeypatch):
    from hallolive_rt.runtime.serve import webrtc

    monkeypatch.setattr(webrtc, "webrtc_available", lambda: False)
    res = CliRunner().invoke(app, ["serve", "--webrtc"])
    assert res.exit_code == 3 and "pip install -e '.[webrtc]'" in res.output
