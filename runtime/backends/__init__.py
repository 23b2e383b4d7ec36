"""Backend registry: ``get_backend(name, **options)`` -> a ``Backend``: ``eager`` (the reference),
``cudagraph`` (each step captured once per static variant and replayed), ``compiled`` (cudagraph with the
DiT's layers compiled while capturing), ``aoti`` and ``tensorrt`` (artifacts of ``hallolive-rt export``,
imported only when asked for: they pull in optional packages). A backend that cannot run here raises
``BackendUnavailable`` saying what is missing.
"""

from __future__ import annotations

import importlib

from .base import Backend, BackendUnavailable, distinct_variants, variant_name

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "get_backend", "available_backends",
           "distinct_variants", "variant_name"]

BACKENDS = ("eager", "cudagraph", "compiled", "aoti", "tensorrt")
_LAZY = {"aoti": "hallolive_rt.runtime.backends.aoti", "tensorrt": "hallolive_rt.runtime.backends.tensorrt"}


def get_backend(name: str, **options) -> Backend:
    """A fresh backend instance. ``options`` go to its constructor (e.g. ``artifact_dir=`` for aoti)."""
    if name == "eager":
        from .eager import EagerBackend

        return EagerBackend(**options)
    if name == "cudagraph":
        from .cudagraph import CudaGraphBackend

        return CudaGraphBackend(**options)
    if name == "compiled":
        from .compiled import CompiledBackend

        return CompiledBackend(**options)
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


def available_backends() -> dict[str, str]:
    """name -> "ok" or the reason it cannot run here (constructs each backend once, cheaply)."""
    out = {}
    for name in BACKENDS:
        try:
            get_backend(name)
            out[name] = "ok"
        except (BackendUnavailable, TypeError) as e:
            out[name] = str(e)
    return out
