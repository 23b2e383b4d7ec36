"""CUDA-graph semantics on a CPU, for tests: record the ops of a captured region, replay them in place.

What a CUDA graph does that eager code does not: every tensor the captured region creates keeps its
memory, and ``replay()`` re-runs the same kernels with the same arguments on that memory. A Python value
computed while capturing (a shape, an int read from a tensor, a branch taken) is frozen into the graph;
a tensor filled before the replay (the static inputs, the session's cursor buffers, the caches) is read
afresh. ``FakeGraph`` reproduces exactly that on any device: while capturing, a ``TorchDispatchMode``
runs each aten op and records (op, arguments, outputs); ``replay()`` runs the recorded ops again with the
recorded arguments (the same tensor objects, whose contents may have changed) and copies each result into
the recorded output's memory. A host sync while capturing (``.item()``, ``.tolist()``, a data-dependent
shape) raises, as ``cudaStreamBeginCapture`` makes it.

``emulate_cuda_graphs(monkeypatch)`` swaps in this graph, no-op streams and devices, and lets
``CudaGraphBackend`` run on the CPU, so its capture and replay logic (static buffers, one graph per
variant and per lean context pass, the cursor read at replay) is tested in CI against eager, bit for bit.
It does not emulate the compiled backend (inductor's CPU kernels are not aten ops a mode can record).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["FakeGraph", "HostSyncInCapture", "emulate_cuda_graphs"]

_HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}


class HostSyncInCapture(RuntimeError):
    """What a real capture raises (cudaErrorStreamCaptureUnsupported) for an op that needs the host."""


class _Record(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNC_OPS:
            raise HostSyncInCapture(f"{func} reads a device value on the host while capturing")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class FakeGraph:
    """``torch.cuda.CUDAGraph`` as far as the backends use it: captured by ``fake_graph``, then ``replay``."""

    def __init__(self):
        self.ops: list = []
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                for o, n in zip(tree_leaves(out), tree_leaves(new)):
                    # in-place ops return their argument, views alias it: the memory already holds the result
                    if isinstance(o, torch.Tensor) and n is not o and not _same_memory(o, n):
                        o.copy_(n)
        self.replays += 1


@contextlib.contextmanager
def fake_graph(graph: FakeGraph, pool=None, **_):
    if graph.ops:
        raise RuntimeError("this graph was already captured")
    with _Record(graph.ops):
        yield


class _FakeStream:
    priority = 0

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, _):
        pass

    def wait_event(self, _):
        pass

    def synchronize(self):
        pass


def emulate_cuda_graphs(monkeypatch) -> None:
    """Let ``CudaGraphBackend`` capture and replay on the CPU with ``FakeGraph`` (pytest ``monkeypatch``)."""
    from hallolive_rt.runtime.backends import cudagraph

    monkeypatch.setattr(cudagraph, "require_cuda", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
