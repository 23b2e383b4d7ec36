"""The ``aoti`` backend: the DiT step as AOTInductor packages built by ``hallolive-rt export --format aoti``.

One ``.pt2`` per static variant. Each package was exported from the in-place wrapper, so it takes the
stream's own state tensors (``DiTState`` caches, text K/V, the cursor's position buffers) and writes the
block's K/V into the caches itself, like the eager forward; ``step`` only routes to the package of
``plan.variant``. ``prepare`` validates the artifact directory (profile, weights, torch version, device
architecture, file hashes) and refuses a mismatch with the command that rebuilds it.
"""

from __future__ import annotations

from hallolive_rt.cache_policy import BlockPlan
from hallolive_rt.export.contracts import dit_variant_name
from hallolive_rt.export.manifest import ArtifactMismatch, load_artifacts

from .base import Backend, BackendUnavailable, distinct_variants, variant_name

__all__ = ["AotiBackend", "create_backend"]

_PREC = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class AotiBackend(Backend):
    name = "aoti"

    def __init__(self, artifact_dir=None, weights_id=None):
        if artifact_dir is None:
            raise BackendUnavailable("the aoti backend needs artifact_dir= (a `hallolive-rt export --format aoti` "
                                     "output directory)")
        self.dir = artifact_dir
        self.weights_id = weights_id  # None: not checked (the caller has no id for its weights)
        self.runners: dict[tuple[int, int], object] = {}
        self.stream = None

    def prepare(self, stream, plans: list[BlockPlan]) -> None:
        from hallolive_rt.export.aoti import load_aoti

        prec = _PREC[str(stream.dtype).removeprefix("torch.")]
        arts = load_artifacts(self.dir, stream.p, self.weights_id or {}, stream.device, fmt="aoti",
                              precision=prec, submodels=("dit",))
        meta = arts.manifest["contracts"]["dit"]["meta"]
        lay = stream.state.layout
        if (meta["slots"], meta["sink"], meta["ring"]) != (lay.slots, lay.sink, lay.ring):
            raise ArtifactMismatch(f"{self.dir}: DiT packages were built for cache layout slots={meta['slots']} "
                                   f"sink={meta['sink']} ring={meta['ring']}, this stream uses {lay}; rebuild: "
                                   f"{arts.manifest['command']}")
        have = set(arts.variants("dit"))
        for v in distinct_variants(plans):
            name = dit_variant_name(*v)
            if name not in have:
                raise ArtifactMismatch(f"{self.dir}: no DiT package for {variant_name(v)} (have {sorted(have)}); "
                                       f"rebuild: {arts.manifest['command']}")
            self.runners[v] = load_aoti(arts.path("dit", name), stream.device)
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
