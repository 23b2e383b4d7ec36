"""Backend registry: ``get_backend(name, **options)`` -> a ``Backend`` (``eager``, ``cudagraph``,
``compiled``; ``aoti`` and ``tensorrt`` run ``hallolive-rt export`` artifacts and are imported only when
asked for). A backend that cannot run here raises ``BackendUnavailable`` saying what is missing."""

from __future__ import annotations

import importlib

from .base import Backend, BackendUnavailable, distinct_variants, variant_name

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "get_backend", "distinct_variants", "variant_name"]

BACKENDS = ("eager", "cudagraph", "compiled", "aoti", "tensorrt")
_BUILTIN = {"eager": (".eager", "EagerBackend"), "cudagraph": (".cudagraph", "CudaGraphBackend"),
            "compiled": (".compiled", "CompiledBackend")}
_LAZY = {"aoti": "hallolive_rt.runtime.backends.aoti", "tensorrt": "hallolive_rt.runtime.backends.tensorrt"}


def get_backend(name: str, **options) -> Backend:
    """A fresh backend instance. ``options`` go to its constructor (e.g. ``artifact_dir=`` for aoti)."""
    if name in _BUILTIN:
        module, cls = _BUILTIN[name]
        return getattr(importlib.import_module(module, __name__), cls)(**options)
    if name in _LAZY:
        try:
            mod = importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise BackendUnavailable(f"backend {name!r} cannot be imported here: {e}") from e
        factory = getattr(mod, "create_backend", None)
        if factory is None:
            raise BackendUnavailable(f"{_LAZY[name]} defines no create_backend(**options)")
        return factory(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
