"""``--backend auto``: the fastest DiT backend whose full-size deviation from eager is committed and within
the bf16 bound, by the measurements under ``bench/results/`` (the table below holds their numbers; a test
reads the files and holds the two equal). On CPU it is eager: every other backend needs CUDA graphs or
exported artifacts. A backend measured fast but whose deviation is not committed is passed over, and the
reason says so; adding its correctness run to ``bench/results/`` (and here) is what makes it the default."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Evidence", "EVIDENCE", "BackendChoice", "pick_backend"]


@dataclass(frozen=True)
class Evidence:
    """One backend at full size on one card: DiT ms per block against eager in the same process, and its
    committed latents' deviation from eager (``None``: not measured)."""

    backend: str
    card: str
    dit_ms: float
    baseline: str  # the backend it was timed against, in the same process
    baseline_ms: float
    within_bound: bool | None  # deviation from eager within the bf16 bound; None: not measured
    deviation: str  # what the deviation run found, in words
    sources: tuple[str, ...]


EVIDENCE = (
    Evidence("cudagraph", "NVIDIA H100 80GB HBM3", 781.96, "eager", 828.01, True,
             "committed latents of 3 blocks bit-identical to eager",
             ("bench/results/h100-a-correctness.json", "bench/results/h100-c-stages.json")),
    Evidence("compiled", "NVIDIA H100 80GB HBM3", 437.28, "cudagraph", 753.66, None,
             "full-size deviation from eager not measured",
             ("bench/results/h100-variants.json",)),
)


@dataclass(frozen=True)
class BackendChoice:
    name: str
    reason: str

    def describe(self) -> dict:
        return {"asked": "auto", "picked": self.name, "reason": self.reason}


def _speed_vs_eager(e: Evidence) -> float:
    """eager ms / this backend's ms, chaining through the baseline it was timed against."""
    if e.baseline == "eager":
        return e.baseline_ms / e.dit_ms
    base = next(b for b in EVIDENCE if b.backend == e.baseline)
    return _speed_vs_eager(base) * e.baseline_ms / e.dit_ms


def pick_backend(device: torch.device | str, artifacts: str | None = None) -> BackendChoice:
    """The backend ``auto`` means on ``device``, with the reason in words (for ``describe()`` and metrics):
    with ``artifacts`` (an export directory), the format it holds."""
    if artifacts is not None:
        try:
            fmt = json.loads((Path(artifacts) / "manifest.json").read_text()).get("format")
        except (OSError, ValueError):
            fmt = None  # the artifact check then names what is wrong with the directory
        fmt = fmt if fmt in ("aoti", "tensorrt") else "aoti"
        return BackendChoice(fmt, f"--artifacts {artifacts} holds a {fmt} export")
    dev = torch.device(device)
    if dev.type != "cuda":
        return BackendChoice("eager", f"on {dev.type} only eager runs (cudagraph and compiled need CUDA, aoti "
                                      f"and tensorrt need exported artifacts)")
    ok = [e for e in EVIDENCE if e.within_bound]
    passed = [f"{e.backend} ({_speed_vs_eager(e):.2f}x eager on the DiT, {e.card}: {e.deviation})"
              for e in EVIDENCE if not e.within_bound]
    if not ok:
        return BackendChoice("eager", "no backend has a committed full-size deviation within the bf16 bound")
    best = max(ok, key=_speed_vs_eager)
    reason = (f"{best.backend}: {_speed_vs_eager(best):.2f}x eager on the DiT at full size ({best.card}), "
              f"{best.deviation} ({', '.join(best.sources)})")
    if passed:
        reason += "; passed over: " + "; ".join(passed)
    return BackendChoice(best.backend, reason)
