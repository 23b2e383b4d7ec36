"""The ``aoti`` backend: the DiT step as AOTInductor packages of ``hallolive-rt export --format aoti``, one
``.pt2`` per static variant, each taking the stream's own state tensors and writing the block's K/V into
the caches itself."""

from __future__ import annotations

from hallolive_rt.cache_policy import BlockPlan
from hallolive_rt.export.contracts import dit_variant_name

from .artifacts import ArtifactBackend
from .base import distinct_variants

__all__ = ["AotiBackend", "create_backend"]


class AotiBackend(ArtifactBackend):
    name = "aoti"
    fmt = "aoti"

    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        from hallolive_rt.export.aoti import load_aoti

        arts = self.check_stream(stream, plans)
        for v in distinct_variants(plans):
            self.loaded[v] = load_aoti(arts.path("dit", dit_variant_name(*v)), stream.device)
        self.stream = stream

    def step(self, xv, xa, vt, at, plan: BlockPlan):
        st, c = self.stream.state, self.stream.cursor
        out = self.loaded[plan.variant](xv, xa, vt, at, st.video_k, st.video_v, st.fusion_k, st.fusion_v,
                                         st.text_k_video, st.text_v_video, st.text_k_audio, st.text_v_audio,
                                         c.video_slot, c.frame0, c.audio0)
        return out[0], out[1]


create_backend = AotiBackend
