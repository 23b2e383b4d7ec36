"""The ``tensorrt`` backend: DiT plans of ``hallolive-rt export --format tensorrt`` (TensorRT 11 and 10).
UNVERIFIED: no TensorRT plan has been built or run with this code (tests/test_trt_api.py checks that every
TensorRT name it uses exists in the 11.x bindings). Engines are functional: the caches are inputs and
``<cache>_out`` outputs, so the updated caches land in scratch buffers (shared by all variants) and are
copied back into ``stream.state`` after each step."""

from __future__ import annotations

import torch

from hallolive_rt.cache_policy import BlockPlan
from hallolive_rt.export.contracts import DIT_CACHES, dit_variant_name
from hallolive_rt.export.trt import TensorRTMissing, require_tensorrt

from .artifacts import ArtifactBackend
from .base import BackendUnavailable, distinct_variants, variant_name

__all__ = ["TensorRTBackend", "create_backend"]


class TensorRTBackend(ArtifactBackend):
    name = "tensorrt"
    fmt = "tensorrt"

    def __init__(self, artifact_dir=None, weights_id=None):
        try:
            trt = require_tensorrt()
        except TensorRTMissing as e:
            raise BackendUnavailable(str(e)) from e
        super().__init__(artifact_dir, weights_id)
        self.trt = trt
        self.scratch: dict[str, torch.Tensor] = {}

    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        trt = self.trt
        arts = self.check_stream(stream, plans)  # refuses a missing variant with the rebuild command
        contracts = {c["name"]: c for c in arts.manifest["contracts"]["dit"]["variants"]}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        for v in distinct_variants(plans):
            name = dit_variant_name(*v)
            spec = contracts[name]
            engine = runtime.deserialize_cuda_engine(arts.path("dit", name).read_bytes())
            ctx = engine.create_execution_context()
            names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            outs = {}
            for o in spec["outputs"]:
                dt = getattr(torch, o["dtype"])
                if o["name"].removesuffix("_out") in DIT_CACHES:
                    buf = self.scratch.setdefault(o["name"], torch.empty(o["shape"], dtype=dt, device=stream.device))
                else:
                    buf = torch.empty(o["shape"], dtype=dt, device=stream.device)
                outs[o["name"]] = buf
                ctx.set_tensor_address(o["name"], buf.data_ptr())
            self.loaded[v] = (engine, ctx, outs, names)
        self.stream = stream

    def step(self, xv, xa, vt, at, plan: BlockPlan):
        engine, ctx, outs, names = self.loaded[plan.variant]
        st, c = self.stream.state, self.stream.cursor
        keep = []  # contiguous copies must outlive the launch
        feed = {"vid_x": xv, "aud_x": xa, "vid_t": vt, "aud_t": at, **st.tensors(),
                "video_slot": c.video_slot, "frame0": c.frame0, "audio0": c.audio0}
        for name, t in feed.items():
            if name in names:  # TensorRT drops inputs a graph never reads
                t = t.contiguous()
                keep.append(t)
                ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {variant_name(plan.variant)}")
        for name in DIT_CACHES:
            getattr(st, name).copy_(outs[f"{name}_out"])
        return outs["flow_v"], outs["flow_a"]


create_backend = TensorRTBackend
