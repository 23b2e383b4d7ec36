"""The ``--metrics`` JSON of a stream (block time, steady FPS, DiT-only and VAE-only FPS equivalents,
TTFF, inter-block gap), computed from one stream's ``DecodedBlock``s by the definitions of
``docs/MEASURE.md``; how each is computed here: ``docs/ARCHITECTURE.md``, "Metrics"."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["stream_metrics", "env_info", "percentile", "achieved_tflops", "write_json", "emitter"]


def percentile(xs, q: float) -> float | None:
    return None if len(xs) == 0 else float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def _median(xs) -> float | None:
    return percentile(xs, 50)


def achieved_tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _git(*args) -> str | None:
    """git's output in the repository this file lives in ("" when it printed nothing); None without git
    or outside a checkout (an installed package), so a clean tree and an unknown one read differently."""
    try:
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(devices: list[torch.device | str] | None = None) -> dict:
    """Where a number was measured: devices, driver, versions, commit."""
    devs = [torch.device(d) for d in (devices or ["cpu"])]
    names = []
    for d in devs:
        if d.type == "cuda":
            prop = torch.cuda.get_device_properties(d)
            names.append(f"{d}: {prop.name} ({prop.total_memory / 2**30:.0f} GiB, sm_{prop.major}{prop.minor})")
        else:
            names.append(f"{d}: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        import av

        av_v = av.__version__
    except ImportError:  # pragma: no cover
        av_v = None
    return {
        "devices": names,
        "driver": _driver() if any(d.type == "cuda" for d in devs) else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "pyav": av_v,
        "platform": platform.platform(),
        # a copy of the tree without .git (the device machine's) names its commit through the environment
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("HALLOLIVE_GIT_COMMIT") or None,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }


def stream_metrics(blocks, *, fps: float, text_encode_s: float | None = None, device: str = "",
                   dtype: str = "", extra: dict | None = None, with_env: bool = True) -> dict:
    """The metrics dict of one stream (see the module docstring for every definition)."""
    if not blocks:
        raise ValueError("no blocks to measure")
    steady = blocks[1:]
    per_block = [{"index": b.index, "frames": int(b.frames.shape[0]), "audio_samples": int(b.audio.shape[0]),
                  "start_s": b.start_s, "first_frame_s": b.first_frame_s, "done_s": b.done_s,
                  "block_time_s": b.done_s - b.start_s, "stage_ms": dict(b.times)} for b in blocks]
    block_times = [r["block_time_s"] for r in per_block[1:]]
    steady_frames = sum(int(b.frames.shape[0]) for b in steady)
    wall = steady[-1].done_s - blocks[0].done_s if steady else None
    ref = steady or blocks  # blocks whose stage times define the FPS-equivalents
    fpb = int(ref[-1].frames.shape[0])
    # a stage that did not run (bench's dit-only / vae-only modes) has no time: its figures are None
    dit_ms = _median([b.times["dit"] for b in ref if "dit" in b.times])
    vae_ms = _median([b.times["vae_video"] + b.times["vae_audio"] for b in ref if "vae_video" in b.times])
    vvid_ms = _median([b.times["vae_video"] for b in ref if "vae_video" in b.times])
    dit_fps = fpb / (dit_ms / 1e3) if dit_ms else None
    vae_fps = fpb / (vae_ms / 1e3) if vae_ms else None
    gaps = [b.first_frame_s - a.first_frame_s for a, b in zip(blocks, blocks[1:])]
    playback = fpb / fps
    gap_p99 = percentile(gaps, 99)
    stage_names = sorted({k for b in blocks for k in b.times})
    out = {
        "definitions": "docs/MEASURE.md; steady state = blocks 2..N; times from the run() call",
        "device": device,
        "dtype": dtype,
        "blocks": len(blocks),
        "frames": sum(r["frames"] for r in per_block),
        "audio_samples": sum(r["audio_samples"] for r in per_block),
        "fps_written": fps,
        "ttff_s": blocks[0].first_frame_s,
        "text_encode_s": text_encode_s,
        "block_time_s": {"median": _median(block_times), "p95": percentile(block_times, 95),
                         "values": block_times},
        "steady_fps": steady_frames / wall if wall else None,
        "steady_wall_s": wall,
        "steady_frames": steady_frames,
        "dit_only_fps_equiv": dit_fps,
        "vae_only_fps_equiv": vae_fps,
        "vae_video_only_fps_equiv": fpb / (vvid_ms / 1e3) if vvid_ms else None,
        "projected_two_device_fps": {"value": min(dit_fps, vae_fps) if dit_fps and vae_fps else None,
                                     "label": "projected: min(DiT-only, VAE-only FPS-equivalent), not measured"},
        "inter_block_gap_s": {"p99": gap_p99, "max": max(gaps) if gaps else None, "values": gaps,
                              "block_playback_s": playback,
                              "real_time": (gap_p99 < playback) if gap_p99 is not None else None},
        "stage_ms_median": {k: _median([b.times[k] for b in ref if k in b.times]) for k in stage_names},
        "per_block": per_block,
    }
    if extra:
        out.update(extra)
    if with_env:
        out["env"] = env_info([device] if device else None)
    return out


def emitter(out: dict, on_update=None, out_json: str | Path | None = None):
    """A function that publishes ``out`` as it grows: to ``on_update(out)`` and, atomically, to ``out_json``."""
    def emit() -> None:
        if on_update is not None:
            on_update(out)
        if out_json is not None:
            write_json(out, out_json)
    return emit


def write_json(obj: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(p)
    return p
