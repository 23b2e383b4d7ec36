"""DiT block exporter: ``DualStreamDiT.forward`` with its state spread into the contract's named tensors,
in two wrappers: ``functional=True`` (ONNX, TensorRT: the caches are inputs and their updated copies
outputs, ``video_k_out``, ...) and ``functional=False`` (AOTInductor: the forward writes the caller's
caches in place, as eager does). Cache writes use the pure-torch reference ops; ``float64_time=False``
gives a float32 time embedding for float64-free targets. Details: ``docs/ARCHITECTURE.md``, "Export"."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hallolive_rt.kvcache import get_kv_ops
from hallolive_rt.model.dit import DualStreamDiT
from hallolive_rt.state import CacheLayout, DiTState, StepPositions

from .contracts import DIT_CACHES, Contract, Variant

__all__ = ["DiTStepModule", "dit_export_mode", "dit_module_for"]


class _Layers(list):
    """Per-layer cache tensors standing in for one [L, B, S, H, D] tensor (``cache[i]``, ``.dtype``)."""

    def __init__(self, tensors, dtype: torch.dtype):
        super().__init__(tensors)
        self.dtype = dtype


@contextlib.contextmanager
def dit_export_mode(dit: DualStreamDiT, *, float64_time: bool):
    """Reference cache ops and the requested time-embedding precision, restored afterwards."""
    old = (dit._kv, dit.video_model.time_fp64, dit.audio_model.time_fp64)
    dit._kv = get_kv_ops("torch")
    dit.video_model.time_fp64 = dit.audio_model.time_fp64 = float64_time
    try:
        yield dit
    finally:
        dit._kv, dit.video_model.time_fp64, dit.audio_model.time_fp64 = old


class DiTStepModule(nn.Module):
    """One DiT variant with explicit tensors; argument order = the contract's input order."""

    def __init__(self, dit: DualStreamDiT, layout: CacheLayout, video_kv_len: int, *, functional: bool):
        super().__init__()
        self.dit, self.layout, self.video_kv_len, self.functional = dit, layout, video_kv_len, functional

    def forward(self, vid_x, aud_x, vid_t, aud_t, video_k, video_v, fusion_k, fusion_v,
                text_k_video, text_v_video, text_k_audio, text_v_audio, video_slot, frame0, audio0):
        caches = (video_k, video_v, fusion_k, fusion_v)
        if self.functional:
            caches = tuple(_Layers([c[i].clone() for i in range(c.shape[0])], c.dtype) for c in caches)
        state = DiTState(self.layout, *caches, text_k_video, text_v_video, text_k_audio, text_v_audio)
        dev = frame0.device
        # the Cursor's positions: block frames / audio tokens are consecutive from frame0 / audio0
        pos = StepPositions(frame0 + torch.arange(vid_x.shape[1], device=dev),
                            audio0 + torch.arange(aud_x.shape[1], device=dev), video_slot)
        flow_v, flow_a = self.dit(vid_x, aud_x, vid_t, aud_t, state, pos, self.video_kv_len)
        return (flow_v, flow_a, *(torch.stack(list(c)) for c in caches)) if self.functional else (flow_v, flow_a)


def dit_module_for(dit: DualStreamDiT, contract: Contract, variant: Variant, *, functional: bool) -> DiTStepModule:
    layout = CacheLayout(**{k: contract.meta[k] for k in ("slots", "sink", "ring")})
    assert tuple(variant.input_names[4:8]) == DIT_CACHES
    return DiTStepModule(dit, layout, variant.static["video_kv_len"], functional=functional).eval()
