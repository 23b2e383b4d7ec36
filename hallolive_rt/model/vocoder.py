"""BigVGAN vocoder (MMAudio's 16 kHz one): log-mel [B, 80, T] -> waveform [B, 1, 256 T] in [-1, 1], made of
plain convs (``fold_weight_norm`` folds the file's weight norm at load); not causal (each sample depends on
about +-25 mel frames). Layout: ``docs/ARCHITECTURE.md``, "Audio decoders".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from hallolive_rt.model.vocoder_activations import AntiAliasedActivation, Snake, SnakeBeta
from hallolive_rt.weights import CheckpointError, assign_state_dict, read_checkpoint

__all__ = ["BigVGANConfig", "BigVGANVocoder", "VocoderConfigError", "fold_weight_norm", "build_vocoder",
           "load_vocoder", "load_vocoder_config"]


@dataclass(frozen=True)
class BigVGANConfig:
    """The generator fields of the release's ``bigvgan_vocoder.yml`` (training-only fields omitted)."""

    resblock: str = "1"
    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"
    snake_logscale: bool = True
    sampling_rate: int = 16000

    @classmethod
    def tiny(cls) -> "BigVGANConfig":
        """Same upsampling (256 samples per mel frame), kernels and dilations; 64..2 channels."""
        return cls(upsample_initial_channel=128)

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)

    def __post_init__(self) -> None:
        if self.resblock != "1":
            raise ValueError(f"resblock {self.resblock!r}: only AMPBlock1 ('1', the released vocoder) is implemented")
        if self.activation not in ("snakebeta", "snake"):
            raise ValueError(f"activation {self.activation!r}: expected 'snakebeta' or 'snake'")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if any((k - u) % 2 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            raise ValueError("each upsample kernel minus its rate must be even (exact rate x length output)")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise ValueError("upsample_initial_channel too small: channels halve at every upsampling stage")


class VocoderConfigError(ValueError):
    """A BigVGAN config file that cannot be used: unreadable, not YAML/JSON, or a missing / ill-typed key."""


_STR, _INT, _BOOL = "a string", "an integer", "true or false"
_INT_LIST, _INT_LISTS = "a list of integers", "a list of lists of integers"
# generator fields of the file -> what each must be; the training fields (learning_rate, batch_size,
# resolutions, mpd_reshapes, dist_config, ...) are ignored
_FIELD_KINDS = {"resblock": _STR, "num_mels": _INT, "upsample_rates": _INT_LIST, "upsample_kernel_sizes": _INT_LIST,
                "upsample_initial_channel": _INT, "resblock_kernel_sizes": _INT_LIST,
                "resblock_dilation_sizes": _INT_LISTS, "activation": _STR, "snake_logscale": _BOOL,
                "sampling_rate": _INT}
_OPTIONAL = {"sampling_rate"}  # absent from MMAudio's yml: its vocoder is the 16 kHz one (the default)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(path: Path, key: str, v):
    kind = _FIELD_KINDS[key]
    if kind == _STR and (isinstance(v, str) or (key == "resblock" and _is_int(v))):  # '1' in the yml, 1 elsewhere
        return str(v)
    if (kind == _INT and _is_int(v)) or (kind == _BOOL and isinstance(v, bool)):
        return v
    if kind == _INT_LIST and isinstance(v, list) and v and all(_is_int(x) for x in v):
        return tuple(v)
    if kind == _INT_LISTS and isinstance(v, list) and v and all(
            isinstance(x, list) and x and all(_is_int(y) for y in x) for x in v):
        return tuple(tuple(x) for x in v)
    raise VocoderConfigError(f"{path}: key {key!r} must be {kind}, got {v!r}")


def load_vocoder_config(path: str | os.PathLike) -> BigVGANConfig:
    """The ``BigVGANConfig`` of BigVGAN's own config file (``.yml``/``.yaml``, or ``.json``): the generator
    fields of ``_FIELD_KINDS``; a missing or ill-typed one raises ``VocoderConfigError`` naming file and key."""
    p = Path(path)
    if not p.is_file():
        raise VocoderConfigError(f"{p}: vocoder config file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocoderConfigError(f"{p}: not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise VocoderConfigError(f"{p}: reading a YAML config needs PyYAML: pip install -e '.[yaml]' "
                                     "(or pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise VocoderConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise VocoderConfigError(f"{p}: top level is a {type(data).__name__}, expected a mapping of BigVGAN "
                                 f"config keys")
    missing = [k for k in _FIELD_KINDS if k not in data and k not in _OPTIONAL]
    if missing:
        raise VocoderConfigError(f"{p}: missing key(s) {', '.join(repr(k) for k in missing)} of the BigVGAN "
                                 f"generator config (has: {', '.join(repr(k) for k in list(data)[:12])})")
    kw = {f.name: _field(p, f.name, data[f.name]) for f in fields(BigVGANConfig) if f.name in data}
    try:
        return BigVGANConfig(**kw)
    except ValueError as e:
        raise VocoderConfigError(f"{p}: {e}") from None


def _activation(cfg: BigVGANConfig, channels: int) -> AntiAliasedActivation:
    act = SnakeBeta if cfg.activation == "snakebeta" else Snake
    return AntiAliasedActivation(act(channels, logscale=cfg.snake_logscale))


class AMPBlock1(nn.Module):
    """Three residual units x += conv2(act(conv1(act(x)))), conv1 dilated by 1/3/5, conv2 undilated."""

    def __init__(self, cfg: BigVGANConfig, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)

        self.convs1 = nn.ModuleList(conv(d) for d in dilations)
        self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
        # Interleaved in the checkpoint: activations[2i] precedes convs1[i], [2i+1] precedes convs2[i].
        self.activations = nn.ModuleList(_activation(cfg, channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            x = x + c2(self.activations[2 * i + 1](c1(self.activations[2 * i](x))))
        return x


class BigVGANVocoder(nn.Module):
    def __init__(self, cfg: BigVGANConfig):
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch0, 7, padding=3)
        # ups[i] is a one-element list in the release, hence the names 'ups.<i>.0.*'.
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(ch0 >> i, ch0 >> (i + 1), k, u, padding=(k - u) // 2)])
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock1(cfg, ch0 >> (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        ch = ch0 >> len(cfg.upsample_rates)
        self.activation_post = _activation(cfg, ch)
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # [B, M, T] -> [B, 1, hop * T]
        n = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            xs = self.resblocks[i * n](x)
            for j in range(1, n):
                xs = xs + self.resblocks[i * n + j](x)
            x = xs / n
        return torch.tanh(self.conv_post(self.activation_post(x)))


# ---- weight norm -----------------------------------------------------------------------------------------

_WN_LAYOUTS = (  # (suffix of g, suffix of v) -> '<conv>.weight'
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fold_weight_norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every (g, v) pair (``_WN_LAYOUTS``) by ``<conv>.weight = g * v / ||v||``, the norm in fp32 over
    all dims but 0 (as torch's weight_norm defaults to); other entries pass through."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, v in sd.items():
        for gs, vs in _WN_LAYOUTS:
            if k.endswith(gs):
                base = k[: -len(gs)]
                if base + vs not in sd:
                    raise CheckpointError(f"weight-norm magnitude {k!r} has no direction {base + vs!r}")
                g, d = v.to(torch.float32), sd[base + vs].to(torch.float32)
                norm = torch.linalg.vector_norm(d, dim=tuple(range(1, d.ndim)), keepdim=True)
                out[base + ".weight"] = (d * (g / norm)).to(sd[base + vs].dtype)
                used.update((k, base + vs))
    for k, v in sd.items():
        if k not in used and not any(k.endswith(vs) for _, vs in _WN_LAYOUTS):
            out[k] = v
        elif k not in used:
            raise CheckpointError(f"weight-norm direction {k!r} has no magnitude (g) next to it")
    return out


# ---- builders / loaders ----------------------------------------------------------------------------------

_INIT_GAIN = 0.6  # hidden convs: std = gain / sqrt(fan_in); larger gains let the snake residuals explode
_INIT_GAIN_POST = 3.0  # conv_post: brings the tanh output to speech level (std ~0.05-0.3)


def build_vocoder(cfg: BigVGANConfig, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> BigVGANVocoder:
    """A randomly initialised vocoder for tests and benchmarks: zero biases and fan-in scaled weights give a
    zero-mean, unsaturated waveform (torch's default init gives a DC offset that makes SNRs meaningless)."""
    with torch.device(device):
        m = BigVGANVocoder(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
                w = mod.weight
                # fan-in of one output sample: a transposed conv sees kernel/stride taps per input channel
                fan = w.shape[1] * w.shape[2] if isinstance(mod, nn.Conv1d) else w.shape[0] * w.shape[2] / mod.stride[0]
                gain = _INIT_GAIN_POST if mod is m.conv_post else _INIT_GAIN
                w.normal_(0.0, gain / math.sqrt(fan))
                mod.bias.zero_()
    return m.to(dtype).eval().requires_grad_(False)


def load_vocoder(path: str | os.PathLike, cfg: BigVGANConfig | str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BigVGANVocoder:
    """Load MMAudio ``ext_weights/best_netG.pt`` (``{'generator': state_dict}`` or a flat state dict),
    folding weight norm once in fp32 before casting to ``dtype``. ``cfg``: a ``BigVGANConfig``, the path
    of BigVGAN's config file (``load_vocoder_config``), or None for the released 16 kHz vocoder."""
    if cfg is not None and not isinstance(cfg, BigVGANConfig):
        cfg = load_vocoder_config(cfg)
    cfg = cfg or BigVGANConfig()
    obj = read_checkpoint(path)
    obj = obj.get("generator", obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: 'generator' is a {type(obj).__name__}, expected a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: no tensors found; expected BigVGAN's {{'generator': state_dict}}")
    try:
        sd = fold_weight_norm(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    with torch.device("meta"):
        m = BigVGANVocoder(cfg)
    assign_state_dict(m, sd, path, dtype=dtype, device=device, what="BigVGAN 16 kHz vocoder")
    return m.eval().requires_grad_(False)
