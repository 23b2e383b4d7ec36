"""The one source of static shapes and precision: a `Profile` read from ``profiles/<name>.toml``.
Every size the runtime, the exporters and the tests use is a field or a derived property here; code
that needs a shape asks the profile instead of writing a number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from hallolive_rt.errors import ProfileError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["Profile", "ProfileError", "load_profile", "list_profiles", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StreamShape:
    batch: int
    blocks: int
    latent_frames_per_block: int
    audio_tokens_per_block: int
    future_audio_tokens: int
    denoising_steps: tuple[float, ...]
    shift: float
    num_train_timesteps: int


@dataclass(frozen=True)
class VideoShape:
    latent_channels: int
    latent_height: int
    latent_width: int
    vae_temporal: int
    vae_spatial: int


@dataclass(frozen=True)
class AudioShape:
    latent_channels: int
    tokens_per_latent_frame: int
    sample_rate: int
    samples_per_token: int
    stream_left_context: int


@dataclass(frozen=True)
class TextShape:
    text_len: int
    text_dim: int


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    video_config: str
    audio_config: str
    decoders: str
    stream: StreamShape
    video: VideoShape
    audio: AudioShape
    text: TextShape
    dtype_name: str
    source: str = field(default="", compare=False)

    # ---- derived shapes (the only place they are computed) -------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def patch_hw(self) -> tuple[int, int]:
        """Token grid of one latent frame after the (1, 2, 2) patch embedding."""
        return self.video.latent_height // 2, self.video.latent_width // 2

    @property
    def tokens_per_latent_frame(self) -> int:
        h, w = self.patch_hw
        return h * w

    @property
    def video_tokens_per_block(self) -> int:
        return self.stream.latent_frames_per_block * self.tokens_per_latent_frame

    @property
    def total_audio_tokens(self) -> int:
        return self.stream.blocks * self.stream.audio_tokens_per_block

    @property
    def audio_window(self) -> int:
        """W = 30 + F: audio tokens denoised per block (only the first 30 are committed)."""
        return self.stream.audio_tokens_per_block + self.stream.future_audio_tokens

    @property
    def fps(self) -> float:
        """Video frame rate at which the two clocks agree exactly (25 fps for the released model).

        One latent frame = ``vae_temporal`` pixel frames = ``tokens_per_latent_frame`` audio tokens.
        """
        tokens_per_s = self.audio.sample_rate / self.audio.samples_per_token
        return tokens_per_s * self.video.vae_temporal / self.audio.tokens_per_latent_frame

    @property
    def pixel_height(self) -> int:
        return self.video.latent_height * self.video.vae_spatial

    @property
    def pixel_width(self) -> int:
        return self.video.latent_width * self.video.vae_spatial

    def pixel_frames(self, latent_frames: int, *, first_block: bool) -> int:
        """Decoded frames for ``latent_frames`` latent frames (the stream's first latent frame gives 1)."""
        t = self.video.vae_temporal
        return 1 + (latent_frames - 1) * t if first_block else latent_frames * t

    def with_overrides(self, *, blocks: int | None = None, future_audio_tokens: int | None = None,
                       dtype: str | None = None, batch: int | None = None,
                       latent_frames_per_block: int | None = None, audio_tokens_per_block: int | None = None,
                       latent_height: int | None = None, latent_width: int | None = None) -> "Profile":
        """A copy with some shape fields changed, validated like a profile file (``ProfileError`` otherwise).

        Block geometry describes other resolutions and block lengths without a new file:
        ``latent_height`` / ``latent_width`` (the latent grid; pixels are ``vae_spatial`` times that, even
        numbers for the 2x2 patches), ``latent_frames_per_block`` (``audio_tokens_per_block`` follows it at
        ``tokens_per_latent_frame`` per frame unless given too, and must equal that product), ``batch``.
        ``blocks``, ``future_audio_tokens`` and ``dtype`` are the fields the CLI changes.
        """
        changes = {k: v for k, v in (("batch", batch), ("blocks", blocks),
                                     ("latent_frames_per_block", latent_frames_per_block),
                                     ("audio_tokens_per_block", audio_tokens_per_block),
                                     ("future_audio_tokens", future_audio_tokens),
                                     ("latent_height", latent_height), ("latent_width", latent_width))
                   if v is not None}
        for k, v in changes.items():  # ranges are _validate's, below
            if isinstance(v, bool) or not isinstance(v, int):
                raise ProfileError(f"{k} must be an integer, got {v!r}")
        if latent_frames_per_block is not None and audio_tokens_per_block is None:
            changes["audio_tokens_per_block"] = latent_frames_per_block * self.audio.tokens_per_latent_frame
        stream = {k: v for k, v in changes.items() if k in StreamShape.__dataclass_fields__}
        video = {k: v for k, v in changes.items() if k in VideoShape.__dataclass_fields__}
        p = replace(self, stream=replace(self.stream, **stream), video=replace(self.video, **video))
        if dtype is not None:
            if dtype not in DTYPES:
                raise ProfileError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            p = replace(p, dtype_name=dtype)
        given = ", ".join(f"{k}={v}" for k, v in changes.items())
        _validate(p, f"profile {self.name} with {given}" if given else f"profile {self.name}")
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    def digest(self) -> str:
        """Stable hash of every shape/precision field (used by export manifests)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _profiles_dir() -> Path:
    return Path(str(resources.files("hallolive_rt.profiles")))


def list_profiles() -> list[str]:
    """Names of the shape presets (Nsight session presets are excluded)."""
    out = []
    for p in sorted(_profiles_dir().glob("*.toml")):
        with open(p, "rb") as fh:
            if "stream" in tomllib.load(fh):
                out.append(p.stem)
    return out


def _section(data: dict, key: str, cls, src: str):
    if key not in data:
        raise ProfileError(f"{src}: missing section [{key}]")
    sec = dict(data[key])
    names = set(cls.__dataclass_fields__)
    missing = sorted(names - set(sec))
    extra = sorted(set(sec) - names)
    if missing or extra:
        raise ProfileError(f"{src}: section [{key}] missing {missing or '-'}; unknown {extra or '-'}")
    if "denoising_steps" in sec:
        sec["denoising_steps"] = tuple(float(x) for x in sec["denoising_steps"])
    return cls(**sec)


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a preset by name (``tiny``, ``hallolive-512x992``) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = _profiles_dir() / f"{name_or_path}.toml"
        if not p.is_file() or str(name_or_path) not in list_profiles():
            raise ProfileError(
                f"unknown preset {str(name_or_path)!r}; available: {', '.join(list_profiles())} "
                f"(or pass a path to a .toml profile)"
            )
    elif not p.is_file():
        raise ProfileError(f"{p}: profile file not found")
    with open(p, "rb") as fh:
        data = tomllib.load(fh)
    src = str(p)
    model = data.get("model", {})
    prof = Profile(
        name=data.get("name", p.stem),
        description=data.get("description", ""),
        video_config=model.get("video_config", ""),
        audio_config=model.get("audio_config", ""),
        decoders=model.get("decoders", "full"),
        stream=_section(data, "stream", StreamShape, src),
        video=_section(data, "video", VideoShape, src),
        audio=_section(data, "audio", AudioShape, src),
        text=_section(data, "text", TextShape, src),
        dtype_name=data.get("precision", {}).get("dtype", "bfloat16"),
        source=src,
    )
    _validate(prof, src)
    return prof


def _validate(p: Profile, src: str) -> None:
    """The rules every profile obeys, whether read from a file or made by ``with_overrides``."""
    v, s = p.video, p.stream
    for name, value, least in (("batch", s.batch, 1), ("blocks", s.blocks, 1),
                               ("latent_frames_per_block", s.latent_frames_per_block, 1),
                               ("future_audio_tokens", s.future_audio_tokens, 0),
                               ("latent_height", v.latent_height, 2), ("latent_width", v.latent_width, 2)):
        if value < least:
            raise ProfileError(f"{src}: {name} must be >= {least}, got {value}")
    if v.latent_height % 2 or v.latent_width % 2:
        raise ProfileError(f"{src}: latent grid {v.latent_height}x{v.latent_width} must be even (2x2 patches)")
    if s.audio_tokens_per_block != s.latent_frames_per_block * p.audio.tokens_per_latent_frame:
        raise ProfileError(
            f"{src}: audio_tokens_per_block ({s.audio_tokens_per_block}) must equal latent_frames_per_block "
            f"x tokens_per_latent_frame ({s.latent_frames_per_block} x {p.audio.tokens_per_latent_frame})"
        )
    if p.dtype_name not in DTYPES:
        raise ProfileError(f"{src}: unknown dtype {p.dtype_name!r}")
