"""Reading a written stream back: ``probe_media`` (the tests' and tools' view of an MP4)."""

from __future__ import annotations

from pathlib import Path

import av

__all__ = ["probe_media"]


def probe_media(path: Path | str) -> dict:
    """Demux (and decode) a media file with PyAV: streams, codecs, frame/sample counts, and end times from
    packet pts + duration on the container timeline (``samples``: decoded audio, AAC priming included). A
    truncated file is read up to the damage and reported with ``error``."""
    out: dict = {"path": str(path), "streams": [], "error": None}
    with av.open(str(path)) as c:
        out["format"] = c.format.name
        info: dict[int, dict] = {}
        for s in c.streams:
            d = {"index": s.index, "type": s.type, "codec": s.codec_context.name,
                 "time_base": s.time_base, "packets": 0, "keyframes": 0, "frames": 0, "samples": 0,
                 "start_s": None, "end_s": None}
            if s.type == "video":
                d.update(width=s.codec_context.width, height=s.codec_context.height,
                         pix_fmt=s.codec_context.pix_fmt, fps=s.guessed_rate or s.base_rate)
            elif s.type == "audio":
                d.update(sample_rate=s.codec_context.sample_rate, channels=s.codec_context.channels)
            info[s.index] = d
            out["streams"].append(d)
        try:
            for pkt in c.demux():
                d = info[pkt.stream.index]
                if pkt.pts is not None and pkt.size:
                    d["packets"] += 1
                    d["keyframes"] += int(pkt.is_keyframe)
                    t0 = float(pkt.pts * pkt.time_base)
                    t1 = float((pkt.pts + (pkt.duration or 0)) * pkt.time_base)
                    d["start_s"] = t0 if d["start_s"] is None else min(d["start_s"], t0)
                    d["end_s"] = t1 if d["end_s"] is None else max(d["end_s"], t1)
                for fr in pkt.decode():
                    d["frames"] += 1
                    d["samples"] += getattr(fr, "samples", 0)
        except av.FFmpegError as e:  # a killed writer can leave a half-written last fragment
            out["error"] = f"{type(e).__name__}: {e}"
    for d in out["streams"]:
        d["duration_s"] = None if d["start_s"] is None else d["end_s"] - d["start_s"]
    out["video"] = [d for d in out["streams"] if d["type"] == "video"]
    out["audio"] = [d for d in out["streams"] if d["type"] == "audio"]
    return out
