"""The ``compiled`` backend: ``CudaGraphBackend`` whose captured forward runs every layer's ``dual_layer``
compiled by inductor (one compiled function per static variant, shared by all layers), under a name of
its own so one ``bench --backends eager,cudagraph,compiled`` run compares all three."""

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
