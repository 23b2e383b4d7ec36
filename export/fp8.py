"""``--precision fp8`` for the DiT: every ``nn.Linear`` weight stored as float8 e4m3fn with a per-row scale
(``<weight>_scale`` [out_features]), each such Linear's input quantized per tensor with a scale calibrated
by running the real streaming loop (``calibrate_dit``), everything else in the compute dtype. One
definition for the weights writer, the graph rewrite (``fp8_graph.py``) and the tests' reference; the
scheme in full: ``docs/ARCHITECTURE.md``, "The fp8 scheme"."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hallolive_rt.model.fp8 import FP8, FP8_MAX, fake_quant, quantize_rows, weight_scale_of

from .weights_file import WeightsLayout, module_tensors

__all__ = ["FP8", "FP8_MAX", "fp8_compute_dtype", "linear_weight_names", "scale_name", "fp8_layout",
           "quantize_rows", "fake_quant", "quantized_values", "Calibration", "calibrate_dit", "calibration_key",
           "manifest_entry"]


def fp8_compute_dtype(profile_dtype: torch.dtype) -> torch.dtype:
    """The dtype of everything an fp8 run does not quantize (module docstring)."""
    return torch.float32 if profile_dtype == torch.float32 else torch.bfloat16


def linear_weight_names(model: nn.Module) -> list[str]:
    """Names of the 2-D weights of every ``nn.Linear`` in ``model`` (its own naming), in module order."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2]


def scale_name(weight_name: str) -> str:
    return f"{weight_name}_scale"


def fp8_layout(model: nn.Module, quantized: Iterable[str]) -> WeightsLayout:
    """``model``'s layout with ``quantized`` weights as float8, each followed by its per-row scale (compute dtype)."""
    quantized = set(quantized)

    def specs():
        for name, t in module_tensors(model):
            yield name, tuple(t.shape), FP8 if name in quantized else t.dtype
            if name in quantized:
                yield scale_name(name), (t.shape[0],), t.dtype
    return WeightsLayout(specs())


def quantized_values(values: Iterable[tuple[str, torch.Tensor]],
                     layout: WeightsLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """``values`` with every tensor the layout stores as float8 replaced by its quantized rows and scale."""
    for name, t in values:
        slot = layout.slots.get(name)
        if slot is not None and slot.dtype == FP8:
            q, s = quantize_rows(t, layout.slots[scale_name(name)].dtype)
            yield name, q
            yield scale_name(name), s
        else:
            yield name, t


@dataclass(frozen=True)
class Calibration:
    """Per-tensor activation amax of each quantized Linear's input (keyed by the Linear's weight name)."""

    blocks: int
    seed: int
    amax: dict[str, float] = field(repr=False)

    def scale(self, weight_name: str, dtype: torch.dtype) -> float:
        """The activation scale of ``weight_name``'s Linear as a float, rounded through ``dtype``."""
        if weight_name not in self.amax:
            raise KeyError(f"no calibrated activation range for {weight_name!r} (its Linear never ran)")
        return float(weight_scale_of(torch.tensor(self.amax[weight_name]), dtype))


def calibration_key(blocks: int, seed: int) -> dict:
    """What decides the activation scales besides the weights: in the manifest and the DiT artifact keys."""
    return {"blocks": blocks, "seed": seed, "inputs": "seeded random noise and prompt context"}


def manifest_entry(compute: str, blocks: int, seed: int, device: str) -> dict:
    """The manifest's ``fp8`` record: what is quantized, how, what is not, and the calibration."""
    return {"submodels": ["dit"], "others": compute, "compute": compute,
            "weights": "nn.Linear weights: float8_e4m3fn, per output channel, scale = amax/448",
            "activations": "nn.Linear inputs: QuantizeLinear/DequantizeLinear float8e4m3fn, per tensor, "
                           "scale = calibrated amax/448",
            "calibration": {**calibration_key(blocks, seed), "device": device}}


@torch.no_grad()
def calibrate_dit(model: nn.Module, values: Iterable[tuple[str, torch.Tensor]], profile, *, seed: int,
                  device: str | torch.device, dtype: torch.dtype) -> Calibration:
    """Run a copy of ``model`` (structure only; may be on the meta device) filled with ``values`` through
    ``BlockStream`` for the profile's blocks, recording the largest ``|input|`` of every Linear."""
    from hallolive_rt.sampler import TorchNoise
    from hallolive_rt.stream import BlockStream

    from .dit import dit_export_mode

    dit = copy.deepcopy(model).to_empty(device=device)
    own = dict(module_tensors(dit))
    filled = set()
    for name, v in values:
        if name in own:
            own[name].copy_(v)
            filled.add(name)
    missing = [n for n, _ in dit.named_parameters() if n not in filled]
    if missing:
        raise ValueError(f"calibration: no value for {len(missing)} DiT parameter(s), e.g. {missing[:3]}")
    dit.reset_rope()  # computed tables, not stored values
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for n, m in dit.named_modules():
        if isinstance(m, nn.Linear) and m.weight.dim() == 2:
            def hook(_mod, args, key=f"{n}.weight"):
                a = args[0].detach().abs().amax().float()
                amax[key] = torch.maximum(amax[key], a) if key in amax else a
            hooks.append(m.register_forward_pre_hook(hook))
    g = torch.Generator().manual_seed(seed)
    s, v, blocks = profile.stream, profile.video, profile.stream.blocks
    fb, na = s.latent_frames_per_block, s.audio_tokens_per_block
    nv = torch.randn(s.batch, blocks * fb, v.latent_channels, v.latent_height, v.latent_width, generator=g)
    nav = torch.randn(s.batch, blocks * na, profile.audio.latent_channels, generator=g)
    ctx = torch.randn(s.batch, profile.text.text_len, profile.text.text_dim, generator=g)
    nv, nav, ctx = (t.to(device=device, dtype=dtype) for t in (nv, nav, ctx))
    try:
        with dit_export_mode(dit, float64_time=False):  # what the exported graphs compute
            bs = BlockStream(dit, profile, blocks=blocks, device=device, dtype=dtype)
            for _ in bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: nav[:, i * na:(i + 1) * na],
                            TorchNoise(seed, device)):
                pass
    finally:
        for h in hooks:
            h.remove()
    return Calibration(blocks, seed, {k: float(a) for k, a in amax.items()})
