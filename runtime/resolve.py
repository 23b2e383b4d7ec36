"""The one place run options meet the machine: ``resolve_run`` checks a ``ModelSource``, ``DiTOptions`` and
``DecoderOptions`` together (preset, block count and cache policy, weights source, devices, model files,
backend and its artifacts, fast paths and levers, video decoder and its runner, KV ops) before any weight
is loaded, and returns what the run will use. Every command calls it: ``stream``, ``bench`` (once per
backend), ``serve`` and each Ray replica; a Ray driver calls it with ``devices=False`` (its replicas'
devices are on other nodes). Every refusal is an ``InputError`` that names the flag and what to do."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from hallolive_rt.cache_policy import choose_policy, parse_blocks, variant_plans
from hallolive_rt.config import load_fusion_config
from hallolive_rt.errors import ArtifactMismatch, BackendUnavailable, InputError, ProfileError
from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource
from hallolive_rt.profile import Profile, load_profile
from hallolive_rt.release import MissingModelFiles, check_model_dir

from .backends.artifacts import ArtifactBackend, backend_for_run
from .backends.auto import BackendChoice, pick_backend
from .backends.cudagraph import require_cuda
from .levers import check_dit_options
from .placement import resolve_devices
from .vae_runner import check_vae_options

__all__ = ["ResolvedRun", "resolve_run"]


@dataclass
class ResolvedRun:
    """What a checked run uses. ``dit.backend`` and ``dit.kv_impl`` are the concrete choices (``auto`` and
    ``None`` resolved); ``backend`` is the backend object (an artifact backend already checked)."""

    profile: Profile
    model: ModelSource
    dit: DiTOptions
    decoders: DecoderOptions
    nblocks: int | None  # None: endless
    policy: object
    dit_device: torch.device | None
    vae_device: torch.device | None
    paths: dict | None  # the official files under model.model_dir
    backend: object | None
    backend_choice: BackendChoice | None  # how ``auto`` chose; None when a backend was named
    kv_ext: dict | None  # the extension's build info (kv_impl ext)


def _check_tiny_decoder(decoders: DecoderOptions, model: ModelSource) -> None:
    if not decoders.tiny:
        if decoders.tiny_weights is not None:
            raise InputError("--tiny-decoder-weights goes with --video-decoder taew2_2 or lighttaew2_2")
        return
    if decoders.tiny_weights is None:
        if model.model_dir is not None:
            raise InputError(f"--video-decoder {decoders.video_decoder} needs its weights: pass "
                             f"--tiny-decoder-weights FILE (the {decoders.video_decoder} release, your download)")
        return  # random weights, like every other model of the run
    if not os.path.isfile(decoders.tiny_weights):
        raise InputError(f"--tiny-decoder-weights {decoders.tiny_weights!r}: no such file")


def resolve_run(model: ModelSource, dit: DiTOptions, decoders: DecoderOptions, *, blocks: int | str | None = None,
                future_audio_frames: int | None = None, text: bool = True, devices: bool = True,
                flag: str = "--backend") -> ResolvedRun:
    """Check everything, load nothing (the KV extension is built here if asked for: before the weights).

    ``blocks`` None: the preset's clip; ``"endless"``: no end. ``text``: the run encodes prompts (the
    release's tokenizer needs the text extra). ``devices=False``: skip what needs this machine's devices.
    ``flag``: the option that named the backend in the command at hand (bench: ``--backends``)."""
    try:
        prof = load_profile(model.preset).with_overrides(future_audio_tokens=future_audio_frames,
                                                         dtype=dit.dtype_with(model.dtype))
        # the profile keeps its released clip length: the policy depends on it (append up to the clip,
        # rolling past it and for endless streams) and refuses a lookahead that would leave the RoPE tables
        nblocks = parse_blocks(blocks if blocks is not None else prof.stream.blocks)
        policy = choose_policy(prof, nblocks, dit.cache_policy)
    except (ProfileError, ValueError) as e:
        raise InputError(str(e)) from e
    model.check_against(prof)
    _check_tiny_decoder(decoders, model)
    if not devices:
        return ResolvedRun(prof, model, dit, decoders, nblocks, policy, None, None, None, None, None, None)
    from hallolive_rt.kvcache.build import require_kv_ext
    from hallolive_rt.model.text_tokenizer import require_text_extra

    try:
        dit_dev, vae_dev = resolve_devices(model.device, model.vae_device)
        if model.model_dir is not None and text:
            require_text_extra()  # the release's tokenizer: said before the model files are looked at
        paths = check_model_dir(model.model_dir) if model.model_dir is not None else None
        choice = pick_backend(dit_dev, dit.artifacts) if dit.backend == "auto" else None
        dit = replace(dit, backend=choice.name if choice else dit.backend, kv_impl=dit.kv_for(dit_dev.type))
        if dit.backend in ("cudagraph", "compiled"):
            require_cuda(dit_dev, what=f"{dit.backend} backend", flag=flag)
        be = backend_for_run(dit.backend, dit.artifacts, model_dir=model.model_dir, seed=model.seed, ema=model.ema,
                             flag=flag)
        if isinstance(be, ArtifactBackend):  # the manifest, contracts, layout and variants: before any weight
            be.check(prof, policy.layout(), {p.variant for p in variant_plans(policy)}, dit_dev, prof.dtype)
        check_dit_options(dit, be.name, dit_dev, prof.dtype, load_fusion_config(prof.video_config, prof.audio_config))
        check_vae_options(decoders.runner, vae_dev)
        kv_ext = require_kv_ext(dit.kv_impl, dit_dev)  # builds/loads the extension now, not after the weights
    except (ValueError, MissingModelFiles, BackendUnavailable, ArtifactMismatch, FileNotFoundError) as e:
        raise InputError(str(e)) from e
    return ResolvedRun(prof, model, dit, decoders, nblocks, policy, dit_dev, vae_dev, paths, be, choice, kv_ext)
