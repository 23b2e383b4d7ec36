"""The opt-in DiT speed levers of issue #15, as one options object for sessions, ``stream`` and ``bench``.

    levers = DiTLevers(precision="fp8", lean_context=True)
    StreamSession(comps, profile, backend="compiled", levers=levers)

  precision     ``--precision``: bf16 | fp16 | fp32 name the compute dtype (the same as ``--dtype``, as the
                export command's flag does); fp8 runs every eligible Linear of the DiT as float8 e4m3 with
                per-row weight scales and dynamic activation scales (``hallolive_rt.model.fp8``), everything
                else in the compute dtype (bf16, or fp32 where the profile computes in fp32: the tiny preset)
  fp8_act_scale ``--fp8-act-scale``: token (one scale per token row, default) or tensor (one per input)
  lean_context  ``--lean-context``: the t = 0 context pass computes only what reaches a cache
                (``DualStreamDiT.forward(context=True)``); caches bit-identical to the full pass
  (the compiled layers are a backend: ``--backend compiled``, ``runtime/backends/compiled.py``)

All are off by default. On the H100 (README, "Speed levers (DiT)") fp8 paid only under the compiled backend
(~1.08x) and the lean pass not measurably; neither's full-size deviation from bf16 is measured yet.
Like ``--fuse-projections``, they change the PyTorch forward, so a backend that runs a compiled artifact
(aoti, tensorrt) refuses them instead of ignoring them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hallolive_rt.model.fp8 import ACT_SCALES, FP8_IMPLS

__all__ = ["DiTLevers", "PRECISIONS", "precision_dtype", "check_levers", "apply_levers", "levers_info"]

PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
_DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FP8_COMPUTE = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class DiTLevers:
    precision: str | None = None  # None: the dtype alone decides (as released)
    fp8_act_scale: str = "token"
    fp8_impl: str = "auto"  # auto: torch._scaled_mm where it runs, else the float32 emulation
    lean_context: bool = False

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.fp8_act_scale not in ACT_SCALES:
            raise ValueError(f"--fp8-act-scale {self.fp8_act_scale!r}: choose one of {', '.join(ACT_SCALES)}")
        if self.fp8_impl not in FP8_IMPLS:
            raise ValueError(f"fp8 impl {self.fp8_impl!r}: choose one of {', '.join(FP8_IMPLS)}")

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def changes_forward(self) -> bool:
        return self.fp8 or self.lean_context

    def to_dict(self) -> dict:
        return asdict(self)


def precision_dtype(precision: str | None, dtype: str | None) -> str | None:
    """The ``--dtype`` a run uses given ``--precision``: bf16/fp16/fp32 stand for it (a different explicit
    ``--dtype`` is a conflict), fp8 leaves it to ``--dtype`` / the preset (its compute dtype)."""
    if precision is None or precision == "fp8":
        return dtype
    if precision not in _DTYPE_OF:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    want = _DTYPE_OF[precision]
    if dtype is not None and dtype != want:
        raise ValueError(f"--precision {precision} means --dtype {want}, but --dtype {dtype} was given: drop one")
    return want


def check_levers(backend: str, levers: DiTLevers, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``levers`` can apply with ``backend`` in ``dtype`` (before loading)."""
    from .session import PYTORCH_FORWARD_BACKENDS

    if levers.changes_forward and backend not in PYTORCH_FORWARD_BACKENDS:
        raise ValueError(f"--precision fp8 / --lean-context change the PyTorch forward, which the {backend} "
                         f"backend does not run (its artifact was compiled by `hallolive-rt export`; for an fp8 "
                         f"TensorRT engine use `hallolive-rt export --precision fp8`): use --backend "
                         f"{' or '.join(PYTORCH_FORWARD_BACKENDS)}, or drop them")
    if levers.fp8 and dtype not in _FP8_COMPUTE:
        raise ValueError(f"--precision fp8 computes everything but the Linear GEMMs in bfloat16 (float32 on the "
                         f"tiny preset), not {str(dtype).removeprefix('torch.')}: drop --dtype or pass bfloat16")


def apply_levers(dit, stream, levers: DiTLevers) -> None:
    """Quantize ``dit`` (once; after fusing) and set the stream's context pass. A DiT already quantized by an
    earlier session cannot go back to its dtype: that is refused, naming the fix."""
    if levers.fp8:
        dit.quantize_fp8(act_scale=levers.fp8_act_scale, impl=levers.fp8_impl)
    elif dit.fp8 is not None:
        raise ValueError("these components hold a float8 DiT (an earlier session used --precision fp8): "
                         "load the components again to run in the compute dtype")
    stream.lean_context = levers.lean_context


def levers_info(dit, stream, backend) -> dict:
    """What a session's describe() / the bench JSON record about the levers."""
    info = {"precision": "fp8" if dit.fp8 is not None else str(stream.dtype).removeprefix("torch."),
            "fp8": dit.fp8, "lean_context": stream.lean_context}
    compile_info = getattr(backend, "compile_info", None)
    if compile_info is not None:
        info["compile"] = compile_info()
    return info
