"""The ``aoti`` backend: the DiT step as AOTInductor packages built by ``hallolive-rt export --format aoti``,
one ``.pt2`` per static variant, each taking the stream's own state tensors (caches, text K/V, the
cursor's positions) and writing the block's K/V into the caches itself; ``step`` routes to the package of
``plan.variant``, ``prepare`` checks the artifact directory (``ArtifactBackend.check``) first.
"""

from __future__ import annotations

from hallolive_rt.cache_policy import BlockPlan
from hallolive_rt.export.contracts import dit_variant_name

from .artifacts import ArtifactBackend
from .base import distinct_variants, variant_name

__all__ = ["AotiBackend", "create_backend"]


class AotiBackend(ArtifactBackend):
    name = "aoti"
    fmt = "aoti"

    def __init__(self, artifact_dir=None, weights_id=None):
        super().__init__(artifact_dir, weights_id)
        self.runners: dict[tuple[int, int], object] = {}
        self.stream = None

    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        from hallolive_rt.export.aoti import load_aoti

        arts = self.check_stream(stream, plans)
        for v in distinct_variants(plans):
            self.runners[v] = load_aoti(arts.path("dit", dit_variant_name(*v)), stream.device)
        self.stream = stream

    def step(self, xv, xa, vt, at, plan: BlockPlan):
        st, c = self.stream.state, self.stream.cursor
        out = self.runners[plan.variant](xv, xa, vt, at, st.video_k, st.video_v, st.fusion_k, st.fusion_v,
                                         st.text_k_video, st.text_v_video, st.text_k_audio, st.text_v_audio,
                                         c.video_slot, c.frame0, c.audio0)
        return out[0], out[1]

    def variants(self) -> list[str]:
        return [variant_name(v) for v in self.runners]


def create_backend(**options) -> AotiBackend:
    return AotiBackend(**options)
