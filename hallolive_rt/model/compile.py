"""Regional compilation: one function compiled once (fullgraph, static shapes) and shared by every module
that runs it, with compilations counted and timed and a recompile-limit hit an error, not a fall back to
eager. ``LayerCompiler`` compiles ``dual_layer``, whose weights are graph inputs, so layers 2..L reuse
layer 1's code; the video decoder's region is its residual block (runtime/vae_runner.py)."""

from __future__ import annotations

import contextlib
import time

import torch

from .dual_layer import dual_layer

__all__ = ["RegionCompiler", "LayerCompiler"]


class RegionCompiler:
    """A ``torch.compile`` backend (inductor, or ``inner`` for tests) that counts and times compilations,
    and ``fn`` compiled with it (fullgraph, static shapes)."""

    def __init__(self, fn, inner: str = "inductor", max_graphs: int = 64):
        self.inner, self.max_graphs = inner, max_graphs
        self.graphs, self.compile_s = 0, 0.0
        self.region = f"{fn.__module__}.{fn.__qualname__}"
        self.fn = torch.compile(fn, backend=self, fullgraph=True, dynamic=False)

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

    def limits(self):
        """While active: at most ``max_graphs`` graphs of the region, and one more is an error."""
        return torch._dynamo.config.patch(recompile_limit=self.max_graphs, fail_on_recompile_limit_hit=True)

    def stats(self) -> dict:
        return {"compiled_graphs": self.graphs, "compile_s": self.compile_s, "fullgraph": True,
                "graph_breaks": 0, "backend": self.inner, "region": self.region}


class LayerCompiler(RegionCompiler):
    """The compiled ``dual_layer`` of the DiT."""

    def __init__(self, inner: str = "inductor", max_graphs: int = 64):
        super().__init__(dual_layer, inner, max_graphs)

    @contextlib.contextmanager
    def active(self, dit):
        """Run ``dit``'s layers through the compiled function inside the block; restore afterwards."""
        old = dit.layer_fn
        dit.layer_fn = self.fn
        try:
            with self.limits():
                yield self
        finally:
            dit.layer_fn = old
