"""Typed run options, one frozen object per concern: where the model comes from (``ModelSource``), how the
DiT runs (``DiTOptions``: backend, KV ops, cache policy, fast paths and speed levers), how the video is
decoded (``DecoderOptions``), where the stream goes (``OutputOptions``) and how live sessions are served
(``ServeOptions``). Each object checks its own values when built (a bad choice raises ``InputError`` naming
the flag); what needs a device, a file or a loaded model is checked once, by
``hallolive_rt.runtime.resolve.resolve_run``, which every command (stream, bench, serve, serve --ray,
profile) calls."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hallolive_rt.errors import InputError

__all__ = ["ModelSource", "DiTOptions", "VideoDecodeOptions", "DecoderOptions", "OutputOptions", "ServeOptions",
           "ice_server", "BACKEND_CHOICES", "KV_IMPLS", "CACHE_POLICIES", "PRECISIONS", "ACT_SCALES", "FP8_IMPLS",
           "ATTENTION_KERNELS", "VAE_BACKENDS", "VIDEO_DECODERS", "DTYPES", "FLAT_KEYS", "default_kv_impl",
           "to_flat", "from_flat"]

BACKEND_CHOICES = ("auto", "eager", "cudagraph", "compiled", "aoti", "tensorrt")
KV_IMPLS = ("ext", "torch")
CACHE_POLICIES = ("auto", "append", "rolling")
PRECISIONS = ("bf16", "fp16", "fp32", "fp8")
ACT_SCALES = ("token", "tensor")
FP8_IMPLS = ("auto", "scaled_mm", "emulate")
ATTENTION_KERNELS = ("auto", "math", "flash", "cudnn", "efficient")
VAE_BACKENDS = ("eager", "compiled", "cudagraph", "compiled-cudagraph")
VIDEO_DECODERS = ("full", "taew2_2", "lighttaew2_2")
DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_OF_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CL_SUFFIX = "+cl3d"


def _choice(flag: str, value, choices, *, optional: bool = False) -> None:
    if value not in choices and not (optional and value is None):
        raise InputError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def default_kv_impl(device_type: str) -> str:
    """The one rule for the KV-cache ops when none is asked for: the extension on CUDA (built once, at the
    first start), the pure-torch reference on CPU (nothing to build before a first stream or page)."""
    return "ext" if device_type == "cuda" else "torch"


@dataclass(frozen=True)
class ModelSource:
    """What is loaded, in which dtype, on which devices: a preset with random weights (tiny always is), or
    the official downloads under ``model_dir``."""

    preset: str = "tiny"
    model_dir: str | None = None
    random_weights: bool = False
    seed: int = 0  # of the random weights
    ema: bool = False  # a nested training checkpoint: its generator_ema entry
    dtype: str | None = None  # None: the preset's
    device: str = "cpu"  # the DiT's (and the decoders' unless vae_device)
    vae_device: str | None = None

    def __post_init__(self):
        if self.model_dir is not None and self.random_weights:
            raise InputError("--model-dir and --random-weights exclude each other: drop one")
        _choice("--dtype", self.dtype, DTYPES, optional=True)

    def check_against(self, profile) -> None:
        """Random weights or the official files, as the preset allows (``profile.decoders == "tiny"``: a
        preset without released weights)."""
        if self.model_dir is None and not self.random_weights and profile.decoders != "tiny":
            raise InputError(f"preset {profile.name} needs weights: pass --model-dir <official download> or "
                             f"--random-weights (the architecture with random weights, for benchmarks)")
        if self.model_dir is not None and profile.decoders == "tiny":
            raise InputError(f"the {profile.name} preset has no released weights; drop --model-dir (it runs with "
                             f"random weights) or choose --preset hallolive-512x992")


@dataclass(frozen=True)
class DiTOptions:
    """How the DiT runs. ``backend="auto"`` picks by committed evidence (``runtime/backends/auto.py``);
    ``kv_impl=None`` follows ``default_kv_impl``. ``fuse_projections``, ``attn_kernel``, ``precision="fp8"``
    and ``lean_context`` change the PyTorch forward: artifact backends (aoti, tensorrt) refuse them."""

    backend: str = "auto"
    artifacts: str | None = None  # the export directory of the aoti / tensorrt backends
    kv_impl: str | None = None
    cache_policy: str = "auto"
    fuse_projections: bool = False
    attn_kernel: str = "auto"
    precision: str | None = None  # None: the dtype alone decides (as released)
    fp8_act_scale: str = "token"
    fp8_impl: str = "auto"  # auto: torch._scaled_mm where it runs, else the float32 emulation
    lean_context: bool = False

    def __post_init__(self):
        _choice("--backend", self.backend, BACKEND_CHOICES)
        _choice("--kv-impl", self.kv_impl, KV_IMPLS, optional=True)
        _choice("--cache-policy", self.cache_policy, CACHE_POLICIES)
        _choice("--attn-kernel", self.attn_kernel, ATTENTION_KERNELS)
        _choice("--precision", self.precision, PRECISIONS, optional=True)
        _choice("--fp8-act-scale", self.fp8_act_scale, ACT_SCALES)
        _choice("fp8 impl", self.fp8_impl, FP8_IMPLS)

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def changes_forward(self) -> bool:
        """Options an artifact backend cannot honour (its kernels were compiled by ``export``)."""
        return self.fp8 or self.lean_context or self.fuse_projections or self.attn_kernel != "auto"

    def kv_for(self, device_type: str) -> str:
        return self.kv_impl or default_kv_impl(device_type)

    def dtype_with(self, dtype: str | None) -> str | None:
        """The dtype a run computes in given ``--dtype``: ``--precision`` bf16/fp16/fp32 name it (a different
        explicit ``--dtype`` is a conflict); fp8 leaves it to ``--dtype`` / the preset (its compute dtype)."""
        if self.precision is None or self.fp8:
            return dtype
        want = _DTYPE_OF_PRECISION[self.precision]
        if dtype is not None and dtype != want:
            raise InputError(f"--precision {self.precision} means --dtype {want}, but --dtype {dtype} was given: "
                             f"drop one")
        return want

    def levers(self) -> dict:
        """What the JSON of a bench and ``describe()`` record of the speed levers."""
        return {k: getattr(self, k) for k in ("precision", "fp8_act_scale", "fp8_impl", "lean_context")}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VideoDecodeOptions:
    """Which runner decodes video frames (``runtime/vae_runner.py``). ``compile_backend``/``compile_mode`` go to
    ``torch.compile`` (tests use the fast ``aot_eager``; the GPU runs ``inductor``)."""

    backend: str = "eager"
    channels_last: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    def __post_init__(self):
        _choice("--vae-backend", self.backend, VAE_BACKENDS)

    @classmethod
    def parse(cls, text: str, channels_last: bool = False) -> "VideoDecodeOptions":
        """``backend[+cl3d]`` -> options; ``channels_last=True`` adds +cl3d (``--vae-channels-last``)."""
        name = text.strip()
        cl = name.endswith(_CL_SUFFIX)
        name = name.removesuffix(_CL_SUFFIX)
        if name not in VAE_BACKENDS:
            raise InputError(f"--vae-backend {text!r}: choose one of {', '.join(VAE_BACKENDS)}, optionally "
                             f"followed by {_CL_SUFFIX} (channels_last_3d layout), e.g. cudagraph{_CL_SUFFIX}")
        return cls(name, cl or channels_last)

    @classmethod
    def parse_list(cls, text: str, channels_last: bool = False) -> list["VideoDecodeOptions"]:
        """Comma-separated variants (bench), in order, without duplicates."""
        out: list[VideoDecodeOptions] = []
        for part in text.split(","):
            if part.strip() and (o := cls.parse(part, channels_last)) not in out:
                out.append(o)
        if not out:
            raise InputError(f"--vae-backend {text!r} names no variant; e.g. eager or cudagraph{_CL_SUFFIX}")
        return out

    @property
    def label(self) -> str:
        return self.backend + (_CL_SUFFIX if self.channels_last else "")

    @property
    def uses_cuda_graph(self) -> bool:
        return self.backend.endswith("cudagraph")

    @property
    def compiles(self) -> bool:
        return self.backend.startswith("compiled")


@dataclass(frozen=True)
class DecoderOptions:
    """The video decoder (the full Wan2.2 decoder, or a tiny preview decoder from ``tiny_weights``), its
    runner, and whether decoding overlaps the DiT."""

    video_decoder: str = "full"
    tiny_weights: str | None = None  # the taew2_2 / lighttaew2_2 file (the user's download)
    runner: VideoDecodeOptions = field(default_factory=VideoDecodeOptions)
    overlap: bool = True

    def __post_init__(self):
        _choice("--video-decoder", self.video_decoder, VIDEO_DECODERS)
        if self.tiny and self.runner.channels_last:
            raise InputError(f"--vae-channels-last lays out the full decoder's 3-D convs; the "
                             f"{self.video_decoder} decoder has 2-D convs only: drop one")

    @property
    def tiny(self) -> bool:
        return self.video_decoder != "full"

    def describe(self) -> dict:
        return {"video_decoder": self.video_decoder, "vae": self.runner.label, "overlap": self.overlap}


@dataclass(frozen=True)
class OutputOptions:
    """Where a stream is written; every path is claimed before any weight is loaded (``overwrite`` or not)."""

    out: str | None = "hallolive.mp4"
    frames_out: str | None = None
    wav_out: str | None = None
    metrics: str | None = None
    overwrite: bool = False

    def named(self) -> list[tuple[str, str | None]]:
        return [("--out", self.out), ("--frames-out", self.frames_out), ("--wav-out", self.wav_out),
                ("--metrics", self.metrics)]


@dataclass(frozen=True)
class ServeOptions:
    """How live sessions are offered: the bind (loopback unless a token is given), the token, the page
    origins allowed, the sessions per process, the transports. The per-client limits are the protocol's
    ``Limits`` (``runtime/serve/protocol.py``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 1
    log_level: str = "info"
    webrtc: bool = False
    ice_servers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_sessions < 1:
            raise InputError(f"--max-sessions must be >= 1, got {self.max_sessions}")
        if self.token is not None and len(self.token) < 8:
            raise InputError("--token must have at least 8 characters")
        if self.ice_servers and not self.webrtc:
            raise InputError("--ice-server is for the WebRTC transport: add --webrtc")
        for spec in self.ice_servers:
            ice_server(spec)


ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def ice_server(spec: str) -> tuple[str, str | None, str | None]:
    """``[USER:CREDENTIAL@]URL`` (``--ice-server``) -> ``(url, username, credential)``; a TURN server needs
    the credentials, a STUN server takes none."""
    auth, _, url = spec.rpartition("@") if "@" in spec else ("", "", spec)
    if not url.startswith(ICE_SCHEMES) or len(url.split(":", 1)[1]) == 0:
        raise InputError(f"--ice-server {spec!r}: expected [USER:CREDENTIAL@]URL with a URL of scheme "
                         f"{', '.join(ICE_SCHEMES)} (e.g. stun:stun.example.org:3478)")
    user, sep, cred = auth.partition(":")
    if url.startswith("turn") != bool(sep and user and cred):
        need = "needs USER:CREDENTIAL@ before it" if url.startswith("turn") else "takes no credentials"
        raise InputError(f"--ice-server {url!r}: a {url.split(':', 1)[0].upper()} server {need}")
    return url, user or None, cred or None


# ---- flat form: the keys of a Ray Serve application's arguments (YAML) --------------------------------------

_MODEL_KEYS = tuple(f for f in ModelSource.__dataclass_fields__)
_DIT_KEYS = tuple(f for f in DiTOptions.__dataclass_fields__)
_DECODER_KEYS = ("video_decoder", "tiny_weights", "vae_backend", "vae_channels_last", "overlap")
FLAT_KEYS = frozenset(_MODEL_KEYS + _DIT_KEYS + _DECODER_KEYS)


def to_flat(model: ModelSource, dit: DiTOptions, decoders: DecoderOptions) -> dict:
    """The three objects as one flat dict of plain values (``from_flat`` reads it back)."""
    out = {**asdict(model), **asdict(dit)}
    out.update(video_decoder=decoders.video_decoder, tiny_weights=decoders.tiny_weights,
               vae_backend=decoders.runner.backend, vae_channels_last=decoders.runner.channels_last,
               overlap=decoders.overlap)
    return out


def from_flat(d: dict) -> tuple[ModelSource, DiTOptions, DecoderOptions]:
    """A flat dict (a subset of ``FLAT_KEYS``; others are the caller's to check) -> the three objects."""
    try:
        model = ModelSource(**{k: d[k] for k in _MODEL_KEYS if k in d})
        dit = DiTOptions(**{k: d[k] for k in _DIT_KEYS if k in d})
        runner = VideoDecodeOptions.parse(d.get("vae_backend", "eager"), bool(d.get("vae_channels_last", False)))
        decoders = DecoderOptions(video_decoder=d.get("video_decoder", "full"), tiny_weights=d.get("tiny_weights"),
                                  runner=runner, overlap=bool(d.get("overlap", True)))
    except TypeError as e:
        raise InputError(f"options: {e}") from None
    return model, dit, decoders
