"""Regional compilation of the DiT: ``dual_layer`` compiled once and shared by every layer.

    compiler = LayerCompiler()
    with compiler.active(dit):          # dit.forward now runs the compiled layer in every layer
        run(...)                        # the first call per LayerStatic / shape compiles, later ones reuse
    compiler.stats()                    # graphs, compile seconds, graph breaks (0: fullgraph)

An eager full-size forward launches ~8,100 kernels; the compiled layer fuses the elementwise work
around each GEMM and attention (norms, modulation, RoPE, gates, the cache writes) into a few kernels.
Compiling the one layer function instead of the whole model keeps compile time to one layer's worth per
static variant (seconds), because every layer has the same code, the same static numbers and
same-shaped inputs: the layer's weights are graph inputs (dynamo inlines built-in ``nn.Module``s), so
layer 2..L hit layer 1's compiled code (``tests/test_compiled_layers.py`` counts it).

``LayerCompiler`` is a dynamo backend wrapping inductor that counts and times every compilation, so the
runtime can report compile time (``CompiledBackend.describe()``, bench JSON). ``active`` also raises
dynamo's recompile limit for the layer function (one graph per variant and layer part is expected, more
than dynamo's default of 8 for a long stream) and makes hitting it an error instead of a silent fall
back to eager.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .dual_layer import dual_layer

__all__ = ["LayerCompiler"]


class LayerCompiler:
    """A ``torch.compile`` backend (inductor, or ``inner`` for tests) that counts and times compilations,
    and the compiled ``dual_layer`` that uses it."""

    def __init__(self, inner: str = "inductor", max_graphs: int = 64):
        self.inner = inner
        self.max_graphs = max_graphs
        self.graphs = 0
        self.compile_s = 0.0
        self.fn = torch.compile(dual_layer, backend=self, fullgraph=True, dynamic=False)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        t = time.perf_counter()
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            out = compile_fx(gm, example_inputs)
        else:
            from torch._dynamo.backends.registry import lookup_backend

            out = lookup_backend(self.inner)(gm, example_inputs)
        self.graphs += 1
        self.compile_s += time.perf_counter() - t
        return out

    @contextlib.contextmanager
    def active(self, dit):
        """Run ``dit``'s layers through the compiled function inside the block; restore afterwards."""
        old = dit.layer_fn
        dit.layer_fn = self.fn
        try:
            with torch._dynamo.config.patch(recompile_limit=self.max_graphs, fail_on_recompile_limit_hit=True):
                yield self
        finally:
            dit.layer_fn = old

    def stats(self) -> dict:
        return {"compiled_graphs": self.graphs, "compile_s": self.compile_s, "fullgraph": True,
                "graph_breaks": 0, "backend": self.inner, "region": "hallolive_rt.model.dual_layer.dual_layer"}
