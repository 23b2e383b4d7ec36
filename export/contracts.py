"""One I/O contract per exported sub-model, derived from the profile (the only place shapes are stated):
per static-shape variant, the tensors an artifact takes and returns (names equal to the forward's
arguments, state tensors by their ``DiTState`` / ``Cursor`` / ``VideoDecodeState`` field names, shapes,
dtypes). Exporters trace with its ``sample_inputs``, ONNX/TensorRT name bindings after it, the manifest
records it and the runtime binds buffers by it. State and variants: ``docs/ARCHITECTURE.md``, "Export"."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hallolive_rt.cache_policy import AppendPolicy, RollingPolicy, variant_plans
from hallolive_rt.config import FusionConfig, load_fusion_config
from hallolive_rt.profile import Profile

__all__ = ["TensorSpec", "Variant", "Contract", "dit_contract", "vae_video_contract", "audio_contract",
           "text_contract", "contracts_for", "SUBMODELS", "DTYPE_NAMES"]

SUBMODELS = ("dit", "vae_video", "audio", "text")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.int64: "int64", torch.int32: "int32", torch.float64: "float64", torch.bool: "bool"}
_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

# DiT state tensors, in DiTState field order; the first four are written by every forward
DIT_CACHES = ("video_k", "video_v", "fusion_k", "fusion_v")
DIT_TEXT = ("text_k_video", "text_v_video", "text_k_audio", "text_v_audio")
DIT_POSITIONS = ("video_slot", "frame0", "audio0")  # Cursor's [1] int64 device buffers


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix

    @property
    def torch_dtype(self) -> torch.dtype:
        return _BY_NAME[self.dtype]

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def sample(self, gen: torch.Generator, device="cpu") -> torch.Tensor:
        """A deterministic sample tensor (integers: zeros, the first block's positions)."""
        if self.torch_dtype in (torch.int64, torch.int32, torch.bool):
            return torch.zeros(self.shape, dtype=self.torch_dtype, device=device)
        return torch.randn(self.shape, generator=gen).to(device=device, dtype=self.torch_dtype)


@dataclass(frozen=True)
class Variant:
    name: str  # file-name safe: "a20_kv24", "first", "w20", "t512"
    static: dict  # the Python ints baked into this graph
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # functional outputs (ONNX/TensorRT), state updates included
    updates: tuple[tuple[str, str], ...] = ()  # (input state name, output name carrying its new value)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @property
    def inplace_outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs of an in-place (AOTInductor) artifact: the state updates happen on the inputs."""
        upd = {o for _, o in self.updates}
        return tuple(s for s in self.outputs if s.name not in upd)

    def sample_inputs(self, seed: int = 0, device="cpu") -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [s.sample(g, device) for s in self.inputs]

    def to_dict(self) -> dict:
        return {"name": self.name, "static": dict(self.static), "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs], "updates": [list(u) for u in self.updates]}


@dataclass(frozen=True)
class Contract:
    submodel: str
    variants: tuple[Variant, ...]
    meta: dict = field(default_factory=dict)  # non-shape facts baked into the graph (cache layout, ...)

    def to_dict(self) -> dict:
        return {"submodel": self.submodel, "meta": dict(self.meta), "variants": [v.to_dict() for v in self.variants]}


def _spec(name, shape, dtype) -> TensorSpec:
    return TensorSpec(name, tuple(int(s) for s in shape), DTYPE_NAMES[dtype] if isinstance(dtype, torch.dtype) else dtype)


# ---- DiT ----------------------------------------------------------------------------------------------

def dit_variant_name(audio_len: int, video_kv_len: int) -> str:
    return f"a{audio_len}_kv{video_kv_len}"


def dit_contract(profile: Profile, cfg: FusionConfig | None = None, *, dtype: torch.dtype | None = None,
                 policy: AppendPolicy | RollingPolicy | None = None) -> Contract:
    """The DiT block forward: DualStreamDiT.forward(vid_x, aud_x, vid_t, aud_t, state, pos, video_kv_len)
    with ``state`` spread into its tensors and ``pos`` into the cursor's three [1] int64 buffers."""
    cfg = cfg or load_fusion_config(profile.video_config, profile.audio_config)
    policy = policy or AppendPolicy(profile)
    dtype = dtype or profile.dtype
    layout = policy.layout()
    s, v = profile.stream, profile.video
    b, fb, n_layers, t = s.batch, s.latent_frames_per_block, cfg.num_layers, profile.text.text_len
    vh, ah = (cfg.video.num_heads, cfg.video.head_dim), (cfg.audio.num_heads, cfg.audio.head_dim)
    shape = {f"{m}_{kv}": (n_layers, b, layout.slots, *h) for m, h in (("video", vh), ("fusion", ah)) for kv in "kv"}
    shape |= {f"text_{kv}_{m}": (n_layers, b, t, *h) for m, h in (("video", vh), ("audio", ah)) for kv in "kv"}
    vid_shape = (b, fb, v.latent_channels, v.latent_height, v.latent_width)
    variants = []
    for plan in variant_plans(policy):  # one plan per distinct static variant, in stream order
        la, kv = plan.variant
        aud_shape = (b, la, profile.audio.latent_channels)
        inputs = [_spec("vid_x", vid_shape, dtype), _spec("aud_x", aud_shape, dtype),
                  _spec("vid_t", (b, fb), torch.float32), _spec("aud_t", (b, la), torch.float32)]
        inputs += [_spec(n, shape[n], dtype) for n in DIT_CACHES + DIT_TEXT]
        inputs += [_spec(n, (1,), torch.int64) for n in DIT_POSITIONS]
        outputs = [_spec("flow_v", vid_shape, dtype), _spec("flow_a", aud_shape, dtype)]
        outputs += [_spec(f"{n}_out", shape[n], dtype) for n in DIT_CACHES]
        variants.append(Variant(dit_variant_name(la, kv), {"audio_len": la, "video_kv_len": kv},
                                tuple(inputs), tuple(outputs), tuple((n, f"{n}_out") for n in DIT_CACHES)))
    meta = {"policy": getattr(policy, "name", "append"), "slots": layout.slots, "sink": layout.sink,
            "ring": layout.ring, "num_layers": n_layers}
    return Contract("dit", tuple(variants), meta)


# ---- video VAE -----------------------------------------------------------------------------------------

def vae_video_contract(profile: Profile, history_shapes: list[tuple[int, ...]], *, dtype: torch.dtype | None = None,
                       z_dim: int | None = None) -> Contract:
    """decode_frame(z, state, first): one latent frame in, 1 (first) or ``vae_temporal`` frames out;
    ``history_shapes``: the decoder's ``new_state(...).shapes()`` (its conv-cache geometry)."""
    dtype = dtype or profile.dtype
    v, b = profile.video, profile.stream.batch
    z = _spec("z", (b, z_dim or v.latent_channels, 1, v.latent_height, v.latent_width), dtype)
    hist = [_spec(f"history_{i}", shp, dtype) for i, shp in enumerate(history_shapes)]
    variants = []
    for name, first in (("first", True), ("next", False)):
        frames = profile.pixel_frames(1, first_block=first)
        out = _spec("frames", (b, 3, frames, profile.pixel_height, profile.pixel_width), dtype)
        outs = [out] + [_spec(f"{h.name}_out", h.shape, dtype) for h in hist]
        variants.append(Variant(name, {"first": first}, (z, *hist), tuple(outs),
                                tuple((h.name, f"{h.name}_out") for h in hist)))
    return Contract("vae_video", tuple(variants), {"history_slots": len(history_shapes)})


# ---- audio decoder + vocoder ---------------------------------------------------------------------------

def audio_windows(profile: Profile) -> list[int]:
    """Window lengths (tokens) the streaming audio decoder feeds, ``start="trim"`` (its default)."""
    s, left = profile.stream, profile.audio.stream_left_context
    n, f = s.audio_tokens_per_block, s.future_audio_tokens
    out = []
    for k in range(s.blocks):
        have = min(k * n, left)
        out.append(have + n + f)
        if f:
            out.append(have + n)  # the stream's end: no future tokens exist
    return sorted(set(out))


def audio_contract(profile: Profile, *, dtype: torch.dtype | None = None) -> Contract:
    """StreamingAudioDecoder.decode_window(window [B, W, C]) -> wav [B, W * samples_per_token]."""
    dtype = dtype or profile.dtype
    b, a = profile.stream.batch, profile.audio
    variants = tuple(
        Variant(f"w{w}", {"window": w}, (_spec("window", (b, w, a.latent_channels), dtype),),
                (_spec("wav", (b, w * a.samples_per_token), dtype),))
        for w in audio_windows(profile))
    return Contract("audio", variants)


# ---- text encoder ----------------------------------------------------------------------------------------

def text_contract(profile: Profile, *, dtype: torch.dtype | None = None) -> Contract:
    """TextEncoder.forward(ids, mask) -> ctx [B, text_len, text_dim]."""
    dtype = dtype or profile.dtype
    b, t = profile.stream.batch, profile.text
    ins = (_spec("ids", (b, t.text_len), torch.int64), _spec("mask", (b, t.text_len), torch.int64))
    return Contract("text", (Variant(f"t{t.text_len}", {"text_len": t.text_len}, ins,
                                     (_spec("ctx", (b, t.text_len, t.text_dim), dtype),)),))


def contracts_for(profile: Profile, dtype: torch.dtype | None = None, *, vae_history: list | None = None) -> dict:
    """Every contract of a profile (the video VAE's needs its history geometry; built if not given)."""
    if vae_history is None:
        from hallolive_rt.model.vae_video import WanVAEConfig, build_video_decoder

        dec = build_video_decoder(WanVAEConfig.from_profile(profile), device="meta")
        vae_history = dec.new_state(profile.stream.batch, profile.video.latent_height,
                                    profile.video.latent_width, device="meta").shapes()
    return {"dit": dit_contract(profile, dtype=dtype), "vae_video": vae_video_contract(profile, vae_history, dtype=dtype),
            "audio": audio_contract(profile, dtype=dtype), "text": text_contract(profile, dtype=dtype)}
