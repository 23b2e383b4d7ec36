"""The artifact check of the compiled backends (aoti, tensorrt), in one place: a directory is trusted only
after ``load_artifacts`` and once its packages fit this stream's cache layout and static variants; checked
before any weight loads, once per run, every refusal naming the command that rebuilds."""

from __future__ import annotations

import torch

from hallolive_rt.export.contracts import dit_variant_name
from hallolive_rt.export.manifest import ArtifactMismatch, LoadedArtifacts, load_artifacts
from hallolive_rt.state import CacheLayout

from .base import Backend, BackendUnavailable, variant_name

__all__ = ["ArtifactBackend", "PRECISION_NAMES"]

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ArtifactBackend(Backend):
    """A backend that runs DiT artifacts of ``hallolive-rt export --format <fmt>`` from ``artifact_dir``."""

    fmt = "?"

    def __init__(self, artifact_dir=None, weights_id=None):
        if artifact_dir is None:
            raise BackendUnavailable(f"the {self.name} backend needs an artifact directory: pass --artifacts DIR "
                                     f"(the --out-dir of `hallolive-rt export --format {self.fmt}`)")
        self.dir = artifact_dir
        self.weights_id = weights_id  # None: not checked (the caller has no id for its weights)
        self._checked: dict[tuple, LoadedArtifacts] = {}
        self.loaded: dict[tuple[int, int], object] = {}  # variant -> what prepare() loaded for it
        self.stream = None

    def variants(self) -> list[str]:
        return [variant_name(v) for v in self.loaded]

    def check(self, profile, layout: CacheLayout, variants, device, dtype: torch.dtype) -> LoadedArtifacts:
        """Refuse (``ArtifactMismatch``) unless the directory serves this stream: ``variants`` are the
        (audio_len, video_kv_len) pairs its plans use, ``layout`` its cache layout. Loads nothing."""
        key = (profile.digest(), layout, tuple(sorted(variants)), str(torch.device(device)), dtype)
        if key in self._checked:
            return self._checked[key]
        arts = load_artifacts(self.dir, profile, self.weights_id or {}, device, fmt=self.fmt,
                              precision=PRECISION_NAMES[dtype], submodels=("dit",))
        meta = arts.manifest["contracts"]["dit"]["meta"]
        if (meta["slots"], meta["sink"], meta["ring"]) != (layout.slots, layout.sink, layout.ring):
            raise ArtifactMismatch(
                f"{self.dir}: the DiT {self.fmt} artifacts were built for cache layout slots={meta['slots']} "
                f"sink={meta['sink']} ring={meta['ring']} (the {meta.get('policy', 'append')} policy), this stream "
                f"uses slots={layout.slots} sink={layout.sink} ring={layout.ring}: stream at most "
                f"{profile.stream.blocks} blocks with the append policy, or use --backend eager|cudagraph\n"
                f"  rebuild: {arts.rebuild}")
        have = set(arts.variants("dit"))
        missing = [variant_name(v) for v in variants if dit_variant_name(*v) not in have]
        if missing:
            raise ArtifactMismatch(f"{self.dir}: no DiT {self.fmt} artifact for {', '.join(missing)} (have "
                                   f"{sorted(have)})\n  rebuild: {arts.rebuild}")
        self._checked[key] = arts
        return arts

    def check_stream(self, stream, plans) -> LoadedArtifacts:
        """``check`` for a ``BlockStream`` about to run ``plans`` (what ``prepare`` does first)."""
        return self.check(stream.p, stream.state.layout, {p.variant for p in plans}, stream.device, stream.dtype)


def backend_for_run(name: str, artifacts: str | None, *, model_dir: str | None, seed: int, ema: bool = False,
                    flag: str = "--backend") -> Backend:
    """The backend ``name`` for a CLI run: the compiled ones get ``artifacts`` and the id of the DiT weights
    the run loads (checked against the manifest); the others refuse ``artifacts`` rather than ignore it.
    Raises ``BackendUnavailable`` / ``ValueError`` with what to change (``flag`` names the option)."""
    from . import get_backend

    if name in ("aoti", "tensorrt"):
        if artifacts is None:
            raise BackendUnavailable(f"{flag} {name} runs the DiT from `hallolive-rt export --format {name}` "
                                     f"artifacts: pass --artifacts DIR (that export's --out-dir)")
        from hallolive_rt.export.submodels import weights_ids

        # the id export records for the DiT weights this run loads: random:<seed> or the file's digest
        weights_id = weights_ids(model_dir, seed, ("dit",), ema=ema)["dit"]
        return get_backend(name, artifact_dir=str(artifacts), weights_id=weights_id)
    if artifacts is not None:
        raise ValueError(f"--artifacts is read by {flag} aoti or tensorrt only ({flag} {name} runs the PyTorch "
                         f"DiT): drop --artifacts, or choose {flag} aoti|tensorrt")
    return get_backend(name)
