"""The GPU session's summary: one headline per entry (from its JSON) and the table printed last."""

from __future__ import annotations

__all__ = ["f", "headline", "table"]


def f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def headline(kind: str, r: dict | None) -> str:
    """The one-line gist of an entry's JSON (the table's last column)."""
    if not r:
        return ""
    try:
        if kind == "check":
            s = r.get("summary", {})
            return "; ".join(f"{k.replace('_vs_', ' vs ')}: video max_rel {f(v.get('video_max_rel'))} "
                             f"audio {f(v.get('audio_max_rel'))} ok={v.get('within_bound')}" for k, v in s.items())
        if kind == "e2e":
            return "; ".join(f"{k}: TTFF {f(v.get('ttff_s'))} s, {f(v.get('steady_fps'))} FPS, gap p99 "
                             f"{f((v.get('inter_block_gap_s') or {}).get('p99'))} s, "
                             f"{f(max((v.get('peak_memory_gib') or {0: None}).values(), key=lambda x: x or 0))} GiB"
                             for k, v in r.get("results", {}).items())
        if kind == "stages":
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
        if kind == "pytest":
            kv = r.get("kv_ext_build") or {}
            kvs = "" if not kv else f"kv ext {'built' if kv.get('ok') else 'FAILED'} in {f(kv.get('s'), '.0f')} s; "
            bad = [t["name"].rsplit("::", 1)[-1] for t in r.get("tests") or []
                   if t.get("outcome") in ("failed", "error")]
            tail = (f"; failed: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}" if bad else "") + \
                (f"; was running {r['running'].rsplit('::', 1)[-1]}" if r.get("running") else "")
            return kvs + ", ".join(f"{n} {k}" for k, n in (r.get("counts") or {}).items() if n) + tail
        if kind == "script":
            res = r.get("results", {})
            ups = {k.split("/")[0]: v for k, v in res.items() if k.endswith("/speedup")}
            return ", ".join(f"{k} x{f(v)}" for k, v in ups.items()) or f"exit {r.get('exit_code')}"
    except (TypeError, ValueError, AttributeError) as e:
        return f"(no headline: {e})"
    return ""


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'entry':<20} {'status':<8} {'time':>11}  result"]
    for r in rows:
        t = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}/{r['box_s']:.0f} s"
        lines.append(f"{r['name']:<20} {r['status']:<8} {t:>11}  {r.get('headline', '')}"[:400])
    return lines
