"""The DiT options (``hallolive_rt.options.DiTOptions``) checked against a backend, a device and a dtype,
applied to a DiT and a block stream, and described: the opt-in fast paths (``fuse_projections``,
``attn_kernel``) and speed levers (``precision="fp8"``: every eligible Linear as float8 e4m3 with per-row
weight scales and dynamic activation scales; ``lean_context``: the t = 0 context pass computes only what
reaches a cache, bit-identical caches). All change the PyTorch forward, so a backend that runs a compiled
artifact (aoti, tensorrt) refuses them instead of ignoring them."""

from __future__ import annotations

import torch

from hallolive_rt.config import FusionConfig
from hallolive_rt.errors import InputError
from hallolive_rt.model.attention import check_attention_kernel
from hallolive_rt.options import DiTOptions

__all__ = ["PYTORCH_FORWARD_BACKENDS", "check_dit_options", "apply_dit_options", "dit_options_info"]

PYTORCH_FORWARD_BACKENDS = ("eager", "cudagraph", "compiled")  # backends that run DualStreamDiT.forward itself
_FP8_COMPUTE = (torch.float32, torch.bfloat16)


def check_dit_options(opts: DiTOptions, backend: str, device, dtype: torch.dtype, cfg: FusionConfig) -> None:
    """Raise ``InputError`` (before anything is loaded) unless ``opts`` can apply with ``backend`` on
    ``device`` in ``dtype``: the attention kernel runs there at the DiT's head dims, an option that changes
    the forward goes with a backend that runs it, fp8 has a compute dtype it supports."""
    try:
        check_attention_kernel(opts.attn_kernel, device, dtype, (cfg.video.head_dim, cfg.audio.head_dim))
    except ValueError as e:
        raise InputError(str(e)) from None
    if opts.changes_forward and backend not in PYTORCH_FORWARD_BACKENDS:
        raise InputError(f"--fuse-projections / --attn-kernel / --precision fp8 / --lean-context change the PyTorch "
                         f"forward, which the {backend} backend does not run (its artifact was compiled by "
                         f"`hallolive-rt export`; for an fp8 TensorRT engine use `hallolive-rt export --precision "
                         f"fp8`): use --backend {' or '.join(PYTORCH_FORWARD_BACKENDS)}, or drop them")
    if opts.fp8 and dtype not in _FP8_COMPUTE:
        raise InputError(f"--precision fp8 computes everything but the Linear GEMMs in bfloat16 (float32 on the "
                         f"tiny preset), not {str(dtype).removeprefix('torch.')}: drop --dtype or pass bfloat16")


def apply_dit_options(dit, stream, opts: DiTOptions) -> None:
    """Set the forward of ``dit`` (fused projections, attention kernel, then fp8 once: after fusing) and the
    stream's context pass. A DiT already quantized by an earlier session cannot go back to its dtype: that is
    refused, naming the fix."""
    if opts.fuse_projections:
        dit.fuse_projections()
    else:
        dit.unfuse_projections()
    dit.set_attention_kernel(opts.attn_kernel)  # before prepare: graphs capture the chosen forward
    if opts.fp8:
        dit.quantize_fp8(act_scale=opts.fp8_act_scale, impl=opts.fp8_impl)
    elif dit.fp8 is not None:
        raise InputError("these components hold a float8 DiT (an earlier session used --precision fp8): "
                         "load the components again to run in the compute dtype")
    stream.lean_context = opts.lean_context


def dit_options_info(dit, stream, backend) -> dict:
    """What a session's ``describe()`` and the bench JSON record about the forward that runs."""
    info = {"fuse_projections": dit.projections_fused, "attn_kernel": dit.attn_kernel,
            "precision": "fp8" if dit.fp8 is not None else str(stream.dtype).removeprefix("torch."),
            "fp8": dit.fp8, "lean_context": stream.lean_context}
    compile_info = getattr(backend, "compile_info", None)
    if compile_info is not None:
        info["compile"] = compile_info()
    return info
