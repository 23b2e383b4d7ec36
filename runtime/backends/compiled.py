"""The ``compiled`` backend: the ``cudagraph`` backend with the DiT's layers compiled while it captures.

Not a copy of the capture code: ``CompiledBackend`` subclasses ``CudaGraphBackend`` and only swaps the
forward it warms up and captures (``_forward_mode``): inside it, every layer of ``DualStreamDiT.forward``
runs ``dual_layer`` compiled by inductor (regional compilation, ``hallolive_rt.model.compile``): compiled
once per static variant (and lean-context layer part) during the first warm-up call, shared by all
layers, then captured into the variant's CUDA graph with the rest of the step (embeddings, heads). After
``prepare`` the DiT is left as it was (eager layers): the graphs hold the compiled kernels.

A separate backend name rather than a ``cudagraph`` option so that one ``hallolive-rt bench --backends
eager,cudagraph,compiled`` run measures eager, captured and compiled+captured in one process, on the same
weights, with ratios to eager (an option would apply to every backend of a run).

``describe()`` / ``compile_info()`` report the compile: graphs compiled, inductor seconds, and the wall
time of the warm-up calls that compiled (tracing + compiling + one run), next to ``capture_s``.
"""

from __future__ import annotations

from hallolive_rt.model.compile import LayerCompiler

from .cudagraph import CudaGraphBackend, _key_name

__all__ = ["CompiledBackend"]


class CompiledBackend(CudaGraphBackend):
    name = "compiled"

    def __init__(self, warmup_iters: int = 2, inner: str = "inductor"):
        super().__init__(warmup_iters=warmup_iters)
        self.compiler = LayerCompiler(inner)
        self.first_call_s: dict[str, float] = {}

    def _forward_mode(self, stream):
        return self.compiler.active(stream.dit)

    def _warmed_up(self, key, first_call_s: float) -> None:
        self.first_call_s[_key_name(key)] = first_call_s

    def compile_info(self) -> dict:
        return {**self.compiler.stats(), "first_warmup_call_s": dict(self.first_call_s),
                "compile_wall_s": sum(self.first_call_s.values()), "capture_s": self.capture_s}

    def describe(self) -> str:
        c = self.compiler.stats()
        return (super().describe() + f"\n  compiled layer graphs: {c['compiled_graphs']} "
                f"(inductor {c['compile_s']:.1f} s, first warm-up calls {sum(self.first_call_s.values()):.1f} s)")
