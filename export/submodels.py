"""The four exported sub-models: where their weights live, how to build them (``build_submodel``: the
module with its weights, for AOTInductor; ``onnx_source``: a traceable module and its tensor values one at
a time, for ONNX, so host memory does not grow with the model), their wrappers, and the memory and disk
each export needs, checked before anything is allocated or written."""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hallolive_rt.config import load_fusion_config
from hallolive_rt.errors import ExportError
from hallolive_rt.profile import Profile
from hallolive_rt.release import MODEL_FILES as RELEASE
from hallolive_rt.release import decoder_configs

from .contracts import Contract, Variant, contracts_for

__all__ = ["SUBMODEL_FILES", "build_submodel", "onnx_source", "OnnxSource", "weights_ids", "wrapper_for",
           "param_bytes", "check_memory", "check_disk", "estimate_peak_bytes", "available_bytes"]

# release files of each exported sub-model, as paths of the one layout in hallolive_rt.release
# (the audio sub-model is the VAE decoder + BigVGAN)
SUBMODEL_FILES = {sub: tuple(getattr(RELEASE, f) for f in names) for sub, names in {
    "dit": ("dit",), "vae_video": ("video_vae",), "audio": ("audio_vae", "vocoder"), "text": ("text_encoder",),
}.items()}
# sub-models whose ONNX export streams its values (nothing resident); the others are built, then read
_STREAMED = ("dit", "text")
# peak memory of an AOTInductor export, in multiples of the weights: the module and the packaged constants
_AOTI_COPIES = 2
_OVERHEAD = 1 << 30
# the process, tracing + optimizing the graph on the meta device, the protobuf: the full-size DiT export
# peaked at 2.7 GiB resident in all (bench/results/cpu-export-onnx-hallolive-512x992.json)
_GRAPH_OVERHEAD = 3 << 30


def weights_ids(model_dir: str | None, seed: int, subs, *, ema: bool = False) -> dict[str, str]:
    """``random:<seed>`` or, per sub-model, the fast file digests of its release files (the DiT's tagged
    ``@generator_ema`` under ``ema``: another entry of a nested file is other weights)."""
    if not model_dir:
        return {s: f"random:{seed}" for s in subs}
    from hallolive_rt.weights import file_digest

    out = {}
    for s in subs:
        paths = [Path(model_dir) / f for f in SUBMODEL_FILES[s]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{s}: missing release file(s) {missing} under --model-dir {model_dir}")
        out[s] = "+".join(file_digest(p)[:32] for p in paths) + ("@generator_ema" if ema and s == "dit" else "")
    return out


def _meta_module(sub: str, profile: Profile) -> torch.nn.Module:
    from hallolive_rt.model.dit import DualStreamDiT
    from hallolive_rt.model.text import TextEncoder
    from hallolive_rt.model.vae_audio import AudioVAEDecoder
    from hallolive_rt.model.vae_video import WanVideoDecoder
    from hallolive_rt.model.vocoder import BigVGANVocoder

    vae_cfg, audio_cfg, vocoder_cfg, text_cfg = decoder_configs(profile)
    with torch.device("meta"):
        if sub == "dit":
            return DualStreamDiT(load_fusion_config(profile.video_config, profile.audio_config))
        if sub == "vae_video":
            return WanVideoDecoder(vae_cfg)
        if sub == "audio":
            return torch.nn.ModuleList([AudioVAEDecoder(audio_cfg), BigVGANVocoder(vocoder_cfg)])
        return TextEncoder(text_cfg)


def param_bytes(sub: str, profile: Profile, dtype: torch.dtype) -> int:
    """Weight bytes of a sub-model in ``dtype``, counted on the meta device (nothing allocated)."""
    return sum(p.numel() for p in _meta_module(sub, profile).parameters()) * dtype.itemsize


def estimate_peak_bytes(sub: str, profile: Profile, dtype: torch.dtype, fmt: str, contract: Contract) -> int:
    """Host (ONNX, TensorRT's ONNX step) or device (AOTInductor) memory one sub-model's export needs."""
    if fmt == "aoti":
        io = max(sum(math.prod(s.shape) * s.torch_dtype.itemsize for s in v.inputs + v.outputs)
                 for v in contract.variants)
        return _AOTI_COPIES * param_bytes(sub, profile, dtype) + io + _OVERHEAD
    resident = 0 if sub in _STREAMED else param_bytes(sub, profile, dtype)
    largest = max(p.numel() for p in _meta_module(sub, profile).parameters()) * 4  # drawn / read as float32
    return resident + 2 * largest + _GRAPH_OVERHEAD


def available_bytes(device: str = "cpu") -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def check_memory(profile: Profile, subs, dtype: torch.dtype, fmt: str, device: str,
                 available: int | None = None) -> None:
    """Refuse, before any allocation, an export whose estimated peak exceeds the memory available."""
    avail = available if available is not None else available_bytes(device if fmt == "aoti" else "cpu")
    contracts = contracts_for(profile, dtype, vae_history=None if "vae_video" in subs else [])
    need = {s: estimate_peak_bytes(s, profile, dtype, fmt, contracts[s]) for s in subs}
    too_big, fits = [s for s in subs if need[s] > avail], [s for s in subs if need[s] <= avail]
    if too_big:
        lines = "; ".join(f"{s} needs ~{need[s] / 2**30:.1f} GiB ({_explain(s, profile, dtype, fmt)})" for s in too_big)
        hint = (f" Sub-models that fit: {','.join(fits)} (export them alone with submodels={tuple(fits)!r})."
                if fits else "")
        raise ExportError(f"not enough memory for a {profile.name} {fmt} export: {lines}; "
                          f"{avail / 2**30:.1f} GiB available ({'GPU' if fmt == 'aoti' and device != 'cpu' else 'MemAvailable'})."
                          f" Use a machine with more memory.{hint}")


def _explain(sub: str, profile: Profile, dtype: torch.dtype, fmt: str) -> str:
    w = param_bytes(sub, profile, dtype) / 2**30
    if fmt == "aoti":
        return f"{_AOTI_COPIES} x {w:.1f} GiB weights + I/O + 1 GiB"
    weights = "weights streamed to disk," if sub in _STREAMED else f"{w:.1f} GiB weights +"
    return f"{weights} 2 x largest tensor + {_GRAPH_OVERHEAD >> 30} GiB for the graph"


def check_disk(profile: Profile, subs, dtype: torch.dtype, out_dir: str | Path, free: int | None = None) -> None:
    """Refuse, before writing anything, an ONNX export whose weights files would not fit on the disk."""
    need = {s: param_bytes(s, profile, dtype) for s in subs}
    free = free if free is not None else shutil.disk_usage(out_dir).free
    total = sum(need.values()) + (64 << 20) * len(subs)  # + graphs and page alignment
    if total > free:
        each = ", ".join(f"{s} {b / 2**30:.1f} GiB" for s, b in need.items())
        raise ExportError(f"not enough disk under {out_dir}: the weights files need ~{total / 2**30:.1f} GiB ({each}), "
                          f"{free / 2**30:.1f} GiB free. Choose another --out-dir or free space.")


def build_submodel(sub: str, profile: Profile, model_dir: str | None, seed: int, dtype: torch.dtype, device, *,
                   ema: bool = False):
    """The sub-model with release weights (``ema``: the DiT entry, see ``load_dit``) or random ones from ``seed``."""
    vae_cfg, audio_cfg, vocoder_cfg, text_cfg = decoder_configs(profile)
    root = Path(model_dir) if model_dir else None
    if sub == "dit":
        from hallolive_rt.model.dit_weights import build_dit, load_dit

        fc = load_fusion_config(profile.video_config, profile.audio_config)
        if root:
            return load_dit(root / SUBMODEL_FILES["dit"][0], fc, device=device, dtype=dtype, ema=ema)
        return build_dit(fc, device=device, dtype=dtype, seed=seed)
    if sub == "vae_video":
        from hallolive_rt.model.vae_video import build_video_decoder, load_video_decoder

        if root:
            return load_video_decoder(root / SUBMODEL_FILES[sub][0], vae_cfg, dtype=dtype, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dec = build_video_decoder(vae_cfg, device="cpu")
            return dec.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if sub == "audio":
        from hallolive_rt.model.vae_audio import build_audio_decoder, load_audio_decoder
        from hallolive_rt.model.vocoder import build_vocoder, load_vocoder

        if root:
            vae_file, vocoder_file = (root / f for f in SUBMODEL_FILES[sub])
            return torch.nn.ModuleList([load_audio_decoder(vae_file, audio_cfg, dtype=dtype, device=device),
                                        load_vocoder(vocoder_file, vocoder_cfg, dtype=dtype, device=device)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.nn.ModuleList([build_audio_decoder(audio_cfg, device=device, dtype=dtype),
                                        build_vocoder(vocoder_cfg, device=device, dtype=dtype)])
    from hallolive_rt.model.text import build_text_encoder, load_text_encoder

    if root:
        return load_text_encoder(root / SUBMODEL_FILES["text"][0], text_cfg, dtype=dtype, device=device)
    return build_text_encoder(text_cfg, device=device, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@dataclass
class OnnxSource:
    """``model``: a module with the sub-model's structure, names and dtypes (parameters may be on the meta
    device); ``values()``: a fresh iterator over ``(name, tensor)`` for every tensor of ``model``."""

    model: torch.nn.Module
    values: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def onnx_source(sub: str, profile: Profile, model_dir: str | None, seed: int, dtype: torch.dtype, *,
                ema: bool = False) -> OnnxSource:
    """Random values equal ``build_submodel(..., device="cpu")``'s with the same seed; release values are checked
    against the model's keys and shapes before anything is written (``CheckpointError`` names file and keys)."""
    from .weights_file import module_tensors

    if sub not in _STREAMED:
        model = build_submodel(sub, profile, model_dir, seed, dtype, "cpu")
        return OnnxSource(model, lambda: module_tensors(model))
    from hallolive_rt.weights import check_state_dict, read_checkpoint, strip_and_select

    model = _meta_module(sub, profile).to(dtype)
    path = Path(model_dir) / SUBMODEL_FILES[sub][0] if model_dir else None
    if sub == "dit":
        from hallolive_rt.model.dit_weights import dit_state_dict_from_file, random_dit_values
        from hallolive_rt.weights import materialize_non_persistent

        # RoPE tables are computed, not stored: real (CPU) buffers in an otherwise meta module
        materialize_non_persistent(model, lambda m: (m.video_model.rope.reset_tables(),
                                                     m.audio_model.rope.reset_tables()), "cpu")
        sd = dit_state_dict_from_file(path, ema=ema) if path else None
        params = (lambda: sd.items()) if sd is not None else (lambda: random_dit_values(model, seed))
        what = "Hallo-Live DiT"
    else:
        from hallolive_rt.model.text import random_text_values

        sd = strip_and_select(read_checkpoint(path)) if path else None
        params = (lambda: sd.items()) if sd is not None else (
            lambda: random_text_values(model.cfg, torch.Generator().manual_seed(seed)))
        what = "umT5 text encoder"
    if sd is not None:
        check_state_dict({k: v.shape for k, v in model.state_dict(keep_vars=True).items()}, sd, path, what=what)
    return OnnxSource(model, lambda: itertools.chain(params(), model.named_buffers()))


def wrapper_for(sub: str, model, contract: Contract, variant: Variant, *, functional: bool) -> torch.nn.Module:
    """The nn.Module whose forward(*contract inputs) an exporter traces."""
    if sub == "dit":
        from .dit import dit_module_for

        return dit_module_for(model, contract, variant, functional=functional)
    if sub == "vae_video":
        from .vae_video import vae_module_for

        return vae_module_for(model, variant, functional=functional)
    if sub == "audio":
        from .audio import AudioWindowModule

        return AudioWindowModule(model[0], model[1]).eval()
    from .text import TextModule

    return TextModule(model).eval()
