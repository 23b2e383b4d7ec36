"""Time to the first frame of a live session, per transport: the WebSocket sends each block as one fMP4
fragment (its first frame leaves with the block's last), WebRTC sends each frame as it is decoded.

    python bench/serve_first_frame.py [--preset tiny] [--sessions 5] [--blocks 3]
        # writes bench/results/<device>-serve-first-frame-<preset>.json; ~1 min on 2 CPU cores (tiny)

One ``serve`` process in this one (uvicorn on loopback, random weights), the sessions run one after the
other, alternating transports. Per session it records what the server measured (``first_frame_out_s``:
from the start message to the first frame leaving the server, the figure ``/health`` reports) and what the
client saw (from sending start to the first frame received: the WebSocket's first fragment, the WebRTC
video track's first decoded frame). A browser's time to its first rendered frame is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hallolive_rt.options import DiTOptions, ModelSource  # noqa: E402
from hallolive_rt.runtime.metrics import env_info, percentile, write_json  # noqa: E402
from hallolive_rt.runtime.serve.app import create_app  # noqa: E402
from hallolive_rt.runtime.serve.launch import build_server  # noqa: E402

PROMPT = "A woman in a red scarf says: <S>hello there<E>"


def _serve(live):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(live, webrtc=True), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def ws_session(addr: str, start: dict) -> tuple[float, float]:
    """One WebSocket session to its end: (seconds from sending start to the first fragment received, the
    server's ``first_frame_out_s`` from the ``end`` event)."""
    from websockets.sync.client import connect

    first = out = None
    with connect(f"ws://{addr}/ws", max_size=2**24) as ws:
        json.loads(ws.recv())  # hello
        t0 = time.perf_counter()
        ws.send(json.dumps({"v": 1, "type": "start", **start}))
        for raw in ws:
            if isinstance(raw, bytes):
                continue
            ev = json.loads(raw)
            if ev["type"] == "block":
                first = first or time.perf_counter() - t0
                ws.send(json.dumps({"v": 1, "type": "ack", "block": ev["index"]}))
            elif ev["type"] == "end":
                out = ev["first_frame_out_s"]
    return first, out


async def rtc_session(addr: str, start: dict) -> tuple[float, float]:
    """One WebRTC session to its ``close`` event: (seconds from sending start to the first video frame
    received, the server's ``first_frame_out_s``)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    ch = pc.createDataChannel("control")
    t = {"closed": asyncio.Event(), "first": asyncio.Event()}

    @ch.on("open")
    def _open():
        t["t0"] = time.perf_counter()
        ch.send(json.dumps({"v": 1, "type": "start", **start}))

    @ch.on("message")
    def _message(raw):
        ev = json.loads(raw)
        if ev["type"] == "block":
            ch.send(json.dumps({"v": 1, "type": "ack", "block": ev["index"]}))
        elif ev["type"] == "end":
            t["out"] = ev["first_frame_out_s"]
        elif ev["type"] == "close":
            t["closed"].set()

    async def drain(track):
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video" and not t["first"].is_set():
                t["first_s"] = time.perf_counter() - t["t0"]
                t["first"].set()

    pulls = []
    pc.on("track", lambda track: pulls.append(asyncio.ensure_future(drain(track))))
    await pc.setLocalDescription(await pc.createOffer())
    req = urllib.request.Request(f"http://{addr}/webrtc/offer", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode())
    answer = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(req, timeout=60).read()))
    await pc.setRemoteDescription(RTCSessionDescription(**answer))
    await asyncio.wait_for(t["closed"].wait(), 300)
    await pc.close()
    for p in pulls:
        p.cancel()
    return t["first_s"], t["out"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, default=5, help="sessions per transport")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    live = build_server(model=ModelSource(preset=a.preset, device=a.device, seed=0), dit=DiTOptions())
    server, addr = _serve(live)
    rows = []
    try:
        for i in range(2 * a.sessions):
            transport = ("ws", "webrtc")[i % 2]
            start = {"prompt": PROMPT, "seed": i // 2, "blocks": a.blocks}
            client_s, out_s = ws_session(addr, start) if transport == "ws" else asyncio.run(rtc_session(addr, start))
            while live.stats()["active_sessions"]:
                time.sleep(0.02)
            rows.append({"transport": transport, "seed": i // 2, "client_first_frame_s": client_s,
                         "server_first_frame_out_s": out_s})
            print(f"{transport:6s} seed {i // 2}: first frame out {out_s:.3f} s, received {client_s:.3f} s",
                  file=sys.stderr)
    finally:
        server.should_exit = True
    summary = {}
    for tr in ("ws", "webrtc"):
        srv = [r["server_first_frame_out_s"] for r in rows if r["transport"] == tr]
        cli = [r["client_first_frame_s"] for r in rows if r["transport"] == tr]
        summary[tr] = {"server_first_frame_out_s_p50": percentile(srv, 50),
                       "client_first_frame_s_p50": percentile(cli, 50), "n": len(srv)}
    info = live.info()
    result = {"command": "python bench/serve_first_frame.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "env": env_info([live.c.dit_device]), "preset": a.preset, "blocks": a.blocks,
              "size": [info["width"], info["height"]], "fps": info["fps"], "summary": summary, "sessions": rows}
    dev = "cpu" if a.device == "cpu" else "cuda"
    out = a.out or REPO / "bench" / "results" / f"{dev}-serve-first-frame-{a.preset}.json"
    write_json(result, out)
    print(json.dumps(summary, indent=1), f"\nwrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
