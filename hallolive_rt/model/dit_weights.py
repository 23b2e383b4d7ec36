"""Checkpoint layouts of the DiT (the released flat file, nested training files, the Ovi teacher's naming)
and how to build it: from a file on the meta device with the mmapped tensors assigned, or with random
weights on a device. The layouts: ``docs/ARCHITECTURE.md``, "Checkpoints".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from ..config import FusionConfig
from ..weights import CheckpointError, assign_state_dict, read_checkpoint, strip_and_select
from .dit import DualStreamDiT

__all__ = ["dit_entry", "dit_state_dict_from_file", "select_dit_weights", "load_dit", "build_dit", "init_random_",
           "random_dit_values", "random_parameter"]

_FSDP = "_fsdp_wrapped_module."
_NESTED = ("generator_ema", "generator")


def dit_entry(ema: bool) -> str:
    """The nested entry a training file is read from: ``generator_ema`` under ``ema``, else ``generator``."""
    return "generator_ema" if ema else "generator"


def select_dit_weights(raw: Mapping[str, object], file: str | os.PathLike, *, ema: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Pick the generator (``dit_entry(ema)`` of a nested file, or the flat file's only set) from any
    released layout and return names as ``DualStreamDiT`` has them."""
    chosen, where = raw, "top level"
    present = [k for k in _NESTED if isinstance(raw.get(k), Mapping)]
    if present:
        want = dit_entry(ema)
        if want not in present:
            other = "--ema (ema=True)" if want == "generator" else "--no-ema (ema=False)"
            raise CheckpointError(f"{file}: no {want!r} entry to load with ema={ema}; the file holds "
                                  f"{', '.join(repr(k) for k in present)} (top-level keys: "
                                  f"{', '.join(repr(k) for k in list(raw)[:8])}). Pass {other} to load it.")
        chosen, where = raw[want], f"entry {want!r}"
    tensors = strip_and_select(chosen, drop_substrings=(_FSDP,))
    if not tensors:
        keys = ", ".join(repr(k) for k in list(raw)[:8])
        raise CheckpointError(f"{file}: no DiT tensors at the {where} (top-level keys: {keys}); expected a flat "
                              f"state dict or one nested under 'generator_ema'/'generator'")
    if all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    return tensors


def dit_state_dict_from_file(path: str | os.PathLike, *, ema: bool = False) -> dict[str, torch.Tensor]:
    return select_dit_weights(read_checkpoint(path), path, ema=ema)


def load_dit(path: str | os.PathLike, cfg: FusionConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.bfloat16, ema: bool = False) -> DualStreamDiT:
    """Build the DiT on the meta device and assign the checkpoint's tensors (strict, cast to ``dtype``);
    ``ema`` (the release's ``--use_ema``, off by default) picks the entry of a nested training file."""
    sd = dit_state_dict_from_file(path, ema=ema)
    with torch.device("meta"):
        model = DualStreamDiT(cfg)
    assign_state_dict(model, sd, path, dtype=dtype, device=device, what="Hallo-Live DiT")
    model.reset_rope()
    return model.eval().requires_grad_(False)


def random_parameter(name: str, shape: torch.Size, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """One parameter's random value (float32, on ``gen``'s device): never zeros (benchmarks must not time
    on zeros, and a zero head would hide bugs); norm weights near 1, modulations scaled by their width."""
    r = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    if "norm" in name and len(shape) == 1:  # RMSNorm / affine LayerNorm weight ~1, bias ~0
        return 1 + 0.1 * r if name.endswith("weight") else 0.1 * r
    if "modulation" in name:
        return r / shape[-1] ** 0.5
    if len(shape) == 1:
        return 0.02 * r
    return r * min(std, math.prod(shape[1:]) ** -0.5)


def random_dit_values(model: DualStreamDiT, seed: int = 0, device: str | torch.device = "cpu"):
    """Yield ``(name, float32 value)`` per parameter from one generator seeded with ``seed`` (what
    ``init_random_`` gives on ``device``); reads only names and shapes, so ``model`` may be on meta."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        yield name, random_parameter(name, p.shape, gen)


@torch.no_grad()
def init_random_(model: DualStreamDiT, seed: int = 0) -> DualStreamDiT:
    """Fill every parameter in place with ``random_dit_values`` (works on any device)."""
    params = dict(model.named_parameters())
    for name, value in random_dit_values(model, seed, next(model.parameters()).device):
        params[name].copy_(value)
    return model


def build_dit(cfg: FusionConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> DualStreamDiT:
    """A DiT with random weights materialised directly on ``device`` in ``dtype`` (no host copy)."""
    with torch.device("meta"):
        model = DualStreamDiT(cfg)
    model = model.to(dtype).to_empty(device=device)  # cast on meta first: one allocation, in dtype
    model.reset_rope()
    init_random_(model, seed)
    return model.eval().requires_grad_(False)
