"""AOTInductor packages (``.pt2``) of the same contracts: ``torch.export`` + ``aoti_compile_and_package``.
Exports the in-place wrappers (``functional=False``): a package updates ``stream.state`` in the caller's
tensors and returns only the flows (frames, wav, ctx). Bound to the build device and torch version."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .contracts import Variant

__all__ = ["export_aoti", "load_aoti", "FAST_BUILD"]

# Inductor settings for CPU test builds: the compile is mostly C++ time, dominated by -O3 kernels.
FAST_BUILD = {"aot_inductor.compile_wrapper_opt_level": "O0"}


def export_aoti(module: torch.nn.Module, variant: Variant, path: str | os.PathLike, *, device="cpu",
                inputs: list[torch.Tensor] | None = None, inductor_configs: dict | None = None) -> Path:
    """Trace ``module`` at the variant's static shapes and compile it into ``path`` (a .pt2 package)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(inputs if inputs is not None else variant.sample_inputs(device=device))
    with torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path),
                                                       inductor_configs=inductor_configs or {})
    return Path(out)


def load_aoti(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A callable runner: ``runner(*inputs)`` -> outputs (a list); mutated inputs are written in place."""
    d = torch.device(device)
    idx = d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else -1)
    return torch._inductor.aoti_load_package(str(path), device_index=idx)
