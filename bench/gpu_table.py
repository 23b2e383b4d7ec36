"""The GPU session's summary for a person: one headline per entry (from its JSON), the viewer's table (per
video decoder: TTFF, steady FPS, inter-block gap p50 / p99 against a block's playback time, the real-time
verdict, peak memory against the cap and whether the run fit), and the table of entries the driver prints
last; ``python bench/gpu_table.py DIR [--card h100]`` prints both again from a session's output folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["f", "headline", "table", "viewer_table", "main"]


def f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _viewer_line(v: dict, cap: dict) -> str:
    g = v.get("gap_s") or {}
    return (f"{v.get('video_decoder')} {v.get('dit_backend')}: TTFF {f(v.get('ttff_s'))} s, {f(v.get('steady_fps'))} "
            f"FPS, gap p50/p99 {f(g.get('p50'))}/{f(g.get('p99'))} s of {f(v.get('block_playback_s'))}, real_time "
            f"{v.get('real_time')}; peak {f(cap.get('peak_reserved_gib'), '.1f')} GiB reserved, cap "
            f"{f(cap.get('cap_gib'))} GiB fits={cap.get('fits')}")


def _e2e(r: dict) -> str:
    if "viewer" in r:
        cap = r["viewer"].get("memory_cap") or {}
        runs = r["viewer"].get("runs") or {}
        return "; ".join(_viewer_line(v, cap) for v in runs.values()) or \
            f"no block finished; cap {f(cap.get('cap_gib'))} GiB fits={cap.get('fits')}"
    asked = ((r.get("phase") or {}).get("options") or {}).get("backends") or []
    pick = (r.get("backend_choice") or {}).get("picked") if "auto" in asked else None
    return "; ".join(f"{'auto -> ' if pick and k.startswith(pick) else ''}{k}: TTFF {f(v.get('ttff_s'))} s, "
                     f"{f(v.get('steady_fps'))} FPS, gap p99 {f((v.get('inter_block_gap_s') or {}).get('p99'))} s, "
                     f"{f(max((v.get('peak_memory_gib') or {0: None}).values(), key=lambda x: x or 0))} GiB"
                     for k, v in r.get("results", {}).items())


def _stages(r: dict) -> str:
    parts = []
    for mode in ("dit", "vae"):
        for k, v in (r.get(mode) or {}).get("results", {}).items():
            sm = v.get("stage_ms_median", {})
            ms = sm.get("dit") if mode == "dit" else (sm.get("vae_video") or 0) + (sm.get("vae_audio") or 0)
            fps = v.get("dit_only_fps_equiv" if mode == "dit" else "vae_only_fps_equiv")
            parts.append(f"{mode} {k}: {f(ms, '.0f')} ms/block ({f(fps)} FPS-eq)")
    if r.get("projected"):
        parts.append(f"projected 2-GPU {f(r['projected'].get('two_device_fps'))} FPS")
    return "; ".join(parts)


def _pytest(r: dict) -> str:
    kv = r.get("kv_ext_build") or {}
    kvs = "" if not kv else f"kv ext {'built' if kv.get('ok') else 'FAILED'} in {f(kv.get('s'), '.0f')} s; "
    bad = [t["name"].rsplit("::", 1)[-1] for t in r.get("tests") or [] if t.get("outcome") in ("failed", "error")]
    tail = (f"; failed: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}" if bad else "") + \
        (f"; was running {r['running'].rsplit('::', 1)[-1]}" if r.get("running") else "")
    return kvs + ", ".join(f"{n} {k}" for k, n in (r.get("counts") or {}).items() if n) + tail


def _ncu(r: dict) -> str:
    s = r.get("summary") or {}
    head = f"{r.get('target')} ({r.get('nvtx_range')}, {r.get('nvtx_include')}): range entered {r.get('range_entered')}x"
    if not s.get("kernels_profiled"):
        return head + (f"; {r['reason']}" if r.get("reason") else "; no kernel profiled")
    top = s["top"][0]
    return (f"{head}; {s['kernels_profiled']} kernels ({s['distinct_kernels']} distinct) {f(s['total_us'] / 1e3)} ms; "
            f"top {top['name'][:48]} x{top['count']} {f(top['total_us'] / 1e3)} ms SM {f(top.get('sm_pct_weighted'))}% "
            f"mem {f(top.get('mem_pct_weighted'))}%; report archived {(r.get('report') or {}).get('archived')}")


def headline(kind: str, r: dict | None) -> str:
    """The one-line gist of an entry's JSON (the table's last column)."""
    if not r:
        return ""
    try:
        if kind == "check":
            s = r.get("summary", {})
            return "; ".join(f"{k.replace('_vs_', ' vs ')}: video max_rel {f(v.get('video_max_rel'))} "
                             f"audio {f(v.get('audio_max_rel'))} ok={v.get('within_bound')}" for k, v in s.items())
        if kind == "script":
            ups = {k.split("/")[0]: v for k, v in r.get("results", {}).items() if k.endswith("/speedup")}
            return ", ".join(f"{k} x{f(v)}" for k, v in ups.items()) or f"exit {r.get('exit_code')}"
        fn = {"e2e": _e2e, "stages": _stages, "pytest": _pytest, "ncu": _ncu}.get(kind)
        return fn(r) if fn else ""
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        return f"(no headline: {e})"


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'entry':<20} {'status':<8} {'time':>11}  result"]
    for r in rows:
        t = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}/{r['box_s']:.0f} s"
        lines.append(f"{r['name']:<20} {r['status']:<8} {t:>11}  {r.get('headline', '')}"[:400])
    return lines


_VIEWER_COLS = (("run", 12), ("DiT", 9), ("blocks", 6), ("policy", 7), ("TTFF s", 7), ("FPS", 6),
                ("gap p50", 7), ("gap p99", 7), ("play s", 6), ("real-time", 9), ("alloc GiB", 9),
                ("rsrvd GiB", 9), ("cap GiB", 7), ("fraction", 8), ("fits", 5), ("need GiB", 8), ("status", 8))


def viewer_table(out_dir: str | Path, card: str) -> list[str]:
    """The viewer's table from ``<card>-e-viewer.json``: one line per entry (its name without ``e-viewer-``:
    the video decoder, and the lever if any). alloc / rsrvd GiB: the peaks of the run measured (under the
    cap, or up to its out-of-memory error); need GiB: the reserved peak of the same run again without the
    cap, when it did not fit."""
    path = Path(out_dir) / f"{card}-e-viewer.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return [f"viewer: no {path.name}"]
    lines = ["viewer: real_time = gap p99 <= a block's playback time and steady FPS >= the stream's fps "
             "(the exact rule: viewer.rule in the JSON)",
             " ".join(f"{c:>{w}}" for c, w in _VIEWER_COLS)]
    for name, rec in data.items():
        viewer, status = rec.get("viewer") or {}, (rec.get("phase") or {}).get("status")
        cap = viewer.get("memory_cap") or {}
        runs = list((viewer.get("runs") or {}).values()) or [{}]
        for v in runs:
            g = v.get("gap_s") or {}
            cells = (name.removeprefix("e-viewer-"), v.get("dit_backend"), v.get("blocks"),
                     v.get("policy"), f(v.get("ttff_s")), f(v.get("steady_fps")), f(g.get("p50")), f(g.get("p99")),
                     f(v.get("block_playback_s")), v.get("real_time"), f(v.get("peak_gpu_allocated_gib"), ".1f"),
                     f(cap.get("peak_reserved_gib"), ".1f"), f(cap.get("cap_gib")), f(cap.get("fraction"), ".3f"),
                     cap.get("fits"), f((cap.get("uncapped_rerun") or {}).get("peak_reserved_gib"), ".1f"), status)
            lines.append(" ".join(f"{'-' if c is None else str(c):>{w}}" for c, (_, w) in zip(cells, _VIEWER_COLS)))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir", type=Path, help="a session's output folder (or bench/results)")
    ap.add_argument("--card", default=None, help="the files' prefix (default: the one session JSON's)")
    a = ap.parse_args(argv)
    sessions = sorted(a.dir.glob(f"{a.card or '*'}-session.json"))
    if not sessions:
        ap.error(f"no {a.card or '<card>'}-session.json in {a.dir}")
    session = json.loads(sessions[-1].read_text())
    card = session.get("card") or sessions[-1].name.removesuffix("-session.json")
    rows = session.get("phases", [])
    for row in rows:  # headlines again from the files: a newer gpu_table reads older files the same way
        name, _, key = (row.get("file") or "").partition(" [")
        try:
            data = json.loads((a.dir / name).read_text())
            row["headline"] = headline(row.get("kind", ""), data.get(key.rstrip("]")) if key else data)
        except (OSError, ValueError):
            pass
    print("\n".join([*viewer_table(a.dir, card), "", *table(rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
