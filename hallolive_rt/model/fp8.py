"""float8 e4m3 Linear layers for the PyTorch path (``--precision fp8``): weights as float8 rows with per-row
scales (bit-identical to the fp8 ONNX export's), activations quantized per token or per tensor, the GEMM by
``torch._scaled_mm`` (``emulate``: the float32 reference); Linears whose features are not multiples of 16
stay in the compute dtype. The scheme: ``docs/ARCHITECTURE.md``, "fp8 in PyTorch".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..options import ACT_SCALES, FP8_IMPLS

__all__ = ["FP8", "FP8_MAX", "ACT_SCALES", "FP8_IMPLS", "quantize_rows", "fake_quant", "weight_scale_of",
           "Float8Linear", "fp8_eligible", "scaled_mm_works", "resolve_fp8_impl", "quantize_linears"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_ALIGN = 16  # _scaled_mm: in and out features multiples of 16


def weight_scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``amax / 448`` (1 where amax is 0), rounded to ``dtype`` and back: the scale actually used."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(dtype).float()


def quantize_rows(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel float8 quantization of a [out, in] weight: ``(q float8, scale [out] scale_dtype)``."""
    w32 = w.detach().float()
    scale = weight_scale_of(w32.abs().amax(dim=1), scale_dtype)
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.to(scale_dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x`` through float8 at ``scale`` and back (what QuantizeLinear -> DequantizeLinear computes)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).to(x.dtype)


def _act_scale(x2: torch.Tensor, mode: str) -> torch.Tensor:
    """[M, K] -> float32 [M, 1] dynamic scales (per token, or one per tensor broadcast to every row)."""
    amax = x2.abs().amax(dim=1, keepdim=True) if mode == "token" else x2.abs().amax().expand(x2.shape[0], 1)
    return weight_scale_of(amax, torch.float32)


def fp8_eligible(linear: nn.Linear) -> bool:
    """Whether ``linear`` is quantized (its shapes fit ``_scaled_mm``; module docstring)."""
    return linear.in_features % _ALIGN == 0 and linear.out_features % _ALIGN == 0


@functools.lru_cache(maxsize=None)
def scaled_mm_works(device: torch.device | str, out_dtype: torch.dtype) -> str | None:
    """None if row-wise ``torch._scaled_mm`` with a bias runs on ``device`` into ``out_dtype``, else torch's
    reason (probed once per device and dtype; host-side set-up, never inside a step)."""
    dev = torch.device(device)
    try:
        a = torch.ones(16, 32, device=dev).to(FP8)
        y = torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1, device=dev), scale_b=torch.ones(1, 16, device=dev),
                             bias=torch.zeros(16, device=dev, dtype=out_dtype), out_dtype=out_dtype)
        if y.shape != (16, 16):
            return f"unexpected result shape {tuple(y.shape)}"
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        return str(e).strip().splitlines()[0]
    return None


def resolve_fp8_impl(impl: str, device: torch.device | str, dtype: torch.dtype) -> tuple[str, str | None]:
    """``(scaled_mm | emulate, why emulated or None)``; ``scaled_mm`` asked for but unavailable raises."""
    if impl not in FP8_IMPLS:
        raise ValueError(f"fp8 impl {impl!r}: choose one of {', '.join(FP8_IMPLS)}")
    if impl == "emulate":
        return "emulate", "asked for"
    why = scaled_mm_works(device, dtype)
    if why is None:
        return "scaled_mm", None
    if impl == "scaled_mm":
        raise ValueError(f"torch._scaled_mm (row-wise float8) cannot run on {device} into {dtype}: {why}")
    return "emulate", f"torch._scaled_mm unavailable on {torch.device(device)} into {dtype}: {why}"


class Float8Linear(nn.Module):
    """``nn.Linear`` with float8 e4m3fn weight rows and dynamic activation scales (module docstring).
    Buffers: ``weight`` [out, in] float8, ``weight_scale`` [1, out] float32, ``bias`` [out] or None."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                 act_scale: str = "token", impl: str = "scaled_mm"):
        super().__init__()
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale {act_scale!r}: choose one of {', '.join(ACT_SCALES)}")
        if impl not in ("scaled_mm", "emulate"):
            raise ValueError(f"impl {impl!r}: scaled_mm or emulate (resolve 'auto' with resolve_fp8_impl)")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act_scale, self.impl = act_scale, impl
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype,
                     **kw) -> "Float8Linear":
        q, s = quantize_rows(weight, compute_dtype)
        b = None if bias is None else bias.detach().to(compute_dtype)
        return cls(q, s.float()[None, :], b, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype, **kw) -> "Float8Linear":
        return cls.from_tensors(linear.weight, linear.bias, compute_dtype=compute_dtype, **kw)

    def view_rows(self, start: int, stop: int) -> "Float8Linear":
        """A Float8Linear over output rows [start, stop) of this one, sharing its storage."""
        b = None if self.bias is None else self.bias[start:stop]
        return Float8Linear(self.weight[start:stop], self.weight_scale[:, start:stop], b, act_scale=self.act_scale,
                            impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_scale={self.act_scale}, impl={self.impl}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        sx = _act_scale(x2, self.act_scale)  # [M, 1] float32
        xq = (x2.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        if self.impl == "scaled_mm":
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale, bias=self.bias,
                                 out_dtype=x.dtype)
        else:  # the same arithmetic in float32: float8 products are exact, scales after the sum
            y = F.linear(xq.float(), self.weight.float()) * sx * self.weight_scale
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)


@torch.no_grad()
def quantize_linears(root: nn.Module, *, compute_dtype: torch.dtype, act_scale: str = "token",
                     impl: str = "scaled_mm") -> dict[str, list[str]]:
    """Replace every eligible ``nn.Linear`` under ``root`` with a ``Float8Linear``, in place; a fused group
    (``model/fused.py``) becomes one ``<group>_fp8`` whose members are row views of it, its bf16 buffers
    dropped. Returns the names quantized and those kept in the compute dtype."""
    from .fused import FusableProjections

    done: list[str] = []
    kept: list[str] = []
    kw = {"compute_dtype": compute_dtype, "act_scale": act_scale, "impl": impl}
    for name, m in list(root.named_modules()):
        if not (isinstance(m, FusableProjections) and m.projections_fused and not m.fp8_frozen):
            continue
        for group, members in m.FUSED_GROUPS.items():
            lins = [getattr(m, n) for n in members]
            if not all(type(lin) is nn.Linear and fp8_eligible(lin) for lin in lins):
                continue
            fused = Float8Linear.from_tensors(getattr(m, f"{group}_weight"), getattr(m, f"{group}_bias"), **kw)
            m.add_module(f"{group}_fp8", fused)
            row = 0
            for n, lin in zip(members, lins):
                setattr(m, n, fused.view_rows(row, row + lin.out_features))
                row += lin.out_features
                done.append(f"{name}.{n}")
            del m._buffers[f"{group}_weight"], m._buffers[f"{group}_bias"]
    for name, m in list(root.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if fp8_eligible(child):
                setattr(m, child_name, Float8Linear.from_linear(child, **kw))
                done.append(full)
            else:
                kept.append(full)
    return {"quantized": done, "kept": kept}
