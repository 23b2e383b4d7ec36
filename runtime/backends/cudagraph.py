"""CUDA-graph backend: every DiT step captured once per static variant (audio_len, video_kv_len) into one
shared memory pool, then replayed on static inputs; the per-block numbers live in the session's ``Cursor``
device buffers, so one graph serves every block of its variant. Capture rules: ``docs/ARCHITECTURE.md``,
"Backends"."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch

from hallolive_rt.cache_policy import BlockPlan

from .base import Backend, BackendUnavailable, distinct_variants, variant_name

__all__ = ["CudaGraphBackend", "require_cuda"]


def require_cuda(device: torch.device | str | None = None, what: str = "cudagraph backend",
                 flag: str = "--backend") -> None:
    """Raise ``BackendUnavailable`` naming what is missing for CUDA graphs on ``device`` (``flag``: the
    option that picks backends in the command at hand, for the fix-it)."""
    if not torch.cuda.is_available():
        built = (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
                 if torch.version.cuda is None else
                 f"torch {torch.__version__} is built with CUDA {torch.version.cuda} but no CUDA device "
                 f"is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
        raise BackendUnavailable(f"the {what} needs a CUDA GPU: {built}. Run on a machine with an NVIDIA GPU "
                                 f"and a CUDA build of torch, or use {flag} eager.")
    if device is not None and torch.device(device).type != "cuda":
        raise BackendUnavailable(f"the {what} captures CUDA graphs, but the DiT is on {device}; "
                                 f"pass --dit-device cuda[:N] or use {flag} eager.")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    xv: torch.Tensor
    xa: torch.Tensor
    vt: torch.Tensor
    at: torch.Tensor
    flow_v: torch.Tensor | None  # None for a lean context pass
    flow_a: torch.Tensor | None


def _graph_keys(stream, plans: list[BlockPlan]) -> list[tuple[tuple[int, int], bool]]:
    """(variant, context) of every graph to capture, largest first: the denoising step of each variant
    and, when the stream runs a lean context pass (``BlockStream.lean_context``), its context pass too."""
    passes = (False, True) if stream.lean_context else (False,)
    return [(v, context) for v in distinct_variants(plans) for context in passes]


def _key_name(key) -> str:
    variant, context = key
    return variant_name(variant) + (" (lean context pass)" if context else "")


class CudaGraphBackend(Backend):
    name = "cudagraph"

    def __init__(self, warmup_iters: int = 2):
        require_cuda(what=f"{self.name} backend")
        if warmup_iters < 1:
            raise ValueError("warmup_iters must be >= 1 (lazy initialisation must stay out of the graph)")
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple[tuple[int, int], bool], _Captured] = {}
        self.pool = None
        self.capture_s: float | None = None

    def _static_inputs(self, stream, audio_len: int, gen: torch.Generator):
        p, dev, dt = stream.p, stream.device, stream.dtype
        b, fb, v = p.stream.batch, p.stream.latent_frames_per_block, p.video

        def rnd(*shape, dtype):
            return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

        xv = rnd(b, fb, v.latent_channels, v.latent_height, v.latent_width, dtype=dt)
        xa = rnd(b, audio_len, p.audio.latent_channels, dtype=dt)
        vt = torch.full((b, fb), 500.0, device=dev)  # float32 like the block loop's timesteps
        at = torch.full((b, audio_len), 500.0, device=dev)
        return xv, xa, vt, at

    def _forward_mode(self, stream):
        """Context manager around warm-up and capture: how the captured forward runs (``compiled`` swaps
        in its compiled layers here; the graphs keep whatever kernels ran while capturing)."""
        return contextlib.nullcontext()

    def _warmed_up(self, key, first_call_s: float) -> None:
        """Called after each graph's warm-up with the first warm-up call's wall time (synchronized)."""

    @torch.no_grad()
    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        dev = torch.device(stream.device)
        require_cuda(dev, what=f"{self.name} backend")
        t0 = time.perf_counter()
        with torch.cuda.device(dev), self._forward_mode(stream):
            self.pool = torch.cuda.graph_pool_handle()
            gen = torch.Generator(device=dev).manual_seed(1234)
            main = torch.cuda.current_stream(dev)
            for key in _graph_keys(stream, plans):
                if key in self._graphs:
                    continue
                variant, context = key
                plan = replace(next(p for p in plans if p.variant == variant), context=context)
                xv, xa, vt, at = self._static_inputs(stream, variant[0], gen)
                stream.cursor.set(plan)  # warm-up writes land inside this variant's rows
                side = torch.cuda.Stream(dev)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    for i in range(self.warmup_iters):
                        t = time.perf_counter()
                        stream.eager_step(xv, xa, vt, at, plan)
                        if i == 0:
                            side.synchronize()
                            self._warmed_up(key, time.perf_counter() - t)
                main.wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    fv, fa = stream.eager_step(xv, xa, vt, at, plan)
                self._graphs[key] = _Captured(g, xv, xa, vt, at, fv, fa)
            torch.cuda.synchronize(dev)
        self.capture_s = time.perf_counter() - t0

    def step(self, xv, xa, vt, at, plan: BlockPlan):
        c = self._graphs.get((plan.variant, plan.context))
        if c is None:
            raise KeyError(f"block {plan.index} needs {_key_name((plan.variant, plan.context))}, which was not "
                           f"captured; captured: {', '.join(self.variants()) or 'none (call prepare first)'}")
        for static, given in ((c.xv, xv), (c.xa, xa), (c.vt, vt), (c.at, at)):
            static.copy_(given)
        c.graph.replay()
        return c.flow_v, c.flow_a

    def variants(self) -> list[str]:
        return [_key_name(k) for k in self._graphs]
