"""Frozen DiT configs built by one adapter from the official JSON schema.
The release ships ``video_causal_5B.json`` and ``audio_causal_5B.json`` (patch_size, model_type, dim,
ffn_dim, freq_dim, num_heads, num_layers, in_dim, out_dim, text_len, text_dim, window_size, qk_norm,
cross_attn_norm, eps, temporal_rope_scaling_factor). ``StreamConfig.from_json`` reads exactly those
names; the decoders' configs live next to their modules (one sub-model, one file)."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from pathlib import Path

from hallolive_rt.errors import ConfigError

__all__ = ["StreamConfig", "FusionConfig", "ConfigError", "load_fusion_config", "embedded_config_path"]


@dataclass(frozen=True)
class StreamConfig:
    """One stream (video or audio) of the dual-stream DiT, in the release's own field names."""

    model_type: str
    patch_size: tuple[int, ...]
    dim: int
    ffn_dim: int
    freq_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_len: int = 512
    text_dim: int = 4096
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    temporal_rope_scaling_factor: float = 1.0

    @property
    def is_audio(self) -> bool:
        return "a" in self.model_type

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_pairs(self) -> tuple[int, int, int]:
        """Complex pairs per RoPE axis (frame, h, w) = 22/21/21 at head_dim 128; audio uses the first."""
        d = self.head_dim
        return (d - 4 * (d // 6)) // 2, d // 6, d // 6

    @property
    def patch_embed_hidden(self) -> int:
        """Hidden width of the audio patch embedding's gated ConvMLP (8192 at dim 3072)."""
        h = int(2 * (4 * self.dim) / 3)
        return 256 * ((h + 255) // 256)

    @classmethod
    def from_json(cls, path: str | Path) -> "StreamConfig":
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: cannot read DiT config JSON ({e})") from e
        return cls.from_dict(raw, source=str(p))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "<dict>") -> "StreamConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown DiT config fields {unknown}")
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = sorted(n for n in required if n not in raw)
        if missing:
            raise ConfigError(f"{source}: missing DiT config fields {missing}")
        kw = dict(raw)
        kw["patch_size"] = tuple(int(x) for x in kw["patch_size"])
        if "window_size" in kw:
            kw["window_size"] = tuple(int(x) for x in kw["window_size"])
        cfg = cls(**kw)
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        if self.model_type not in ("t2v", "ti2v", "t2a"):
            raise ConfigError(f"{source}: model_type {self.model_type!r} is not a text-conditioned stream")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ConfigError(f"{source}: dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.is_audio and self.patch_size != (1,):
            raise ConfigError(f"{source}: audio stream needs patch_size [1], got {list(self.patch_size)}")
        if not self.is_audio and len(self.patch_size) != 3:
            raise ConfigError(f"{source}: video stream needs a 3D patch_size, got {list(self.patch_size)}")
        if self.window_size != (-1, -1):
            raise ConfigError(f"{source}: windowed attention (window_size {self.window_size}) is not supported")


@dataclass(frozen=True)
class FusionConfig:
    """The pair of stream configs of one dual-stream DiT (same depth, fused in every layer)."""

    video: StreamConfig
    audio: StreamConfig

    def __post_init__(self):
        if self.video.is_audio or not self.audio.is_audio:
            raise ConfigError("FusionConfig needs a video config first and an audio config second")
        if self.video.num_layers != self.audio.num_layers:
            raise ConfigError(f"video and audio streams must have the same depth ({self.video.num_layers} vs "
                              f"{self.audio.num_layers})")
        if self.video.text_dim != self.audio.text_dim:
            raise ConfigError("video and audio streams must share text_dim (one text context feeds both)")

    @property
    def num_layers(self) -> int:
        return self.video.num_layers

    @classmethod
    def from_json(cls, video_json: str | Path, audio_json: str | Path) -> "FusionConfig":
        return cls(StreamConfig.from_json(video_json), StreamConfig.from_json(audio_json))


def embedded_config_path(name: str) -> Path:
    """Path of an embedded official-schema JSON (``video_causal_5B``, ``audio_tiny``, ...)."""
    p = Path(str(resources.files("hallolive_rt.configs"))) / f"{name}.json"
    if not p.is_file():
        avail = sorted(q.stem for q in p.parent.glob("*.json"))
        raise ConfigError(f"no embedded DiT config {name!r}; available: {', '.join(avail)}")
    return p


def load_fusion_config(video: str | Path, audio: str | Path) -> FusionConfig:
    """Build a ``FusionConfig`` from embedded names or paths to official-schema JSON files."""

    def resolve(x):
        p = Path(x)
        return p if p.suffix == ".json" else embedded_config_path(str(x))

    return FusionConfig.from_json(resolve(video), resolve(audio))
