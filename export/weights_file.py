"""The external-data weights file every ONNX variant of a sub-model shares (``<sub>_<profile>_<precision>
.weights``), planned from names, shapes and dtypes alone and written one tensor at a time from any
``(name, tensor)`` iterator, so host memory holds one tensor and a 21.7 GiB DiT lands on disk once, not
once per variant. The file appears under its name only when complete (written as ``.partial``, renamed)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["ALIGN", "Slot", "WeightsLayout", "write_weights", "on_meta", "module_tensors", "tensor_names"]

ALIGN = 4096  # every tensor starts on a page: onnxruntime and TensorRT may memory-map external data
_REPORT_FROM = 1 << 30  # bytes: smaller files are written without progress lines


class WeightsFileError(RuntimeError):
    """Values that do not fit the planned layout (unknown name, wrong shape, missing tensors)."""


@dataclass(frozen=True)
class Slot:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class WeightsLayout:
    """Name -> ``Slot`` for every parameter and buffer of a module, in its own (deterministic) order."""

    def __init__(self, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]]):
        self.slots: dict[str, Slot] = {}
        off = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
            self.slots[name] = Slot(off, nbytes, tuple(shape), dtype)
            off += -(-nbytes // ALIGN) * ALIGN
        self.total = off

    @classmethod
    def of(cls, module: nn.Module) -> WeightsLayout:
        return cls((n, tuple(t.shape), t.dtype) for n, t in module_tensors(module))

    def digest(self) -> str:
        """Names, shapes, dtypes and offsets: equal digests mean a graph's offsets still hold."""
        text = "".join(f"{name}:{s.shape}:{s.dtype}:{s.offset};" for name, s in self.slots.items())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer (persistent or not): what an exported graph can reference."""
    yield from module.named_parameters()
    yield from module.named_buffers()


def tensor_names(wrapper: nn.Module, model: nn.Module) -> dict[str, str]:
    """Wrapper-qualified name (what an exported graph calls a tensor) -> the model's own name."""
    own = {id(t): n for n, t in module_tensors(model)}
    return {n: own[id(t)] for n, t in module_tensors(wrapper) if id(t) in own}


def write_weights(path: str | os.PathLike, layout: WeightsLayout, values: Iterable[tuple[str, torch.Tensor]], *,
                  what: str = "model", log: Callable[[str], None] | None = None, progress_every: float = 0.1) -> Path:
    """Write ``values`` into ``path`` at the layout's offsets; every slot must be filled exactly once."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    done, seen, t0, next_report = 0, set(), time.perf_counter(), progress_every
    try:
        with open(tmp, "wb") as fh:
            fh.truncate(layout.total)
            for name, t in values:
                slot = layout.slots.get(name)
                if slot is None:
                    raise WeightsFileError(f"{what}: a value named {name!r} has no place in the weights layout "
                                           f"({len(layout.slots)} tensors); the source and the model disagree")
                if tuple(t.shape) != slot.shape:
                    raise WeightsFileError(f"{what}: {name!r} has shape {tuple(t.shape)}, the model expects {slot.shape}")
                if name in seen:
                    raise WeightsFileError(f"{what}: {name!r} was given twice")
                seen.add(name)
                flat = t.detach().to(device="cpu", dtype=slot.dtype).contiguous().reshape(-1)
                fh.seek(slot.offset)
                fh.write(memoryview(flat.view(torch.uint8).numpy()))
                done += slot.nbytes
                del flat
                if log and layout.total >= _REPORT_FROM and done / layout.total >= next_report:
                    rate = done / max(time.perf_counter() - t0, 1e-9) / 2**20
                    log(f"[export] {path.name}: {done / 2**30:.1f} / {layout.total / 2**30:.1f} GiB ({rate:.0f} MiB/s)")
                    next_report += progress_every
        missing = [n for n in layout.slots if n not in seen]
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightsFileError(f"{what}: no value for {len(missing)} tensor(s): {shown}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def on_meta(module: nn.Module):
    """Every parameter and buffer of ``module`` replaced by a meta tensor of the same shape and dtype for
    the duration (tracing reads structure, never values), then put back exactly as they were."""
    saved = []
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is None or t.is_meta:
                    continue
                saved.append((store, k, t))
                meta = torch.empty_like(t, device="meta")
                store[k] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    try:
        yield module
    finally:
        for store, k, t in saved:
            store[k] = t
