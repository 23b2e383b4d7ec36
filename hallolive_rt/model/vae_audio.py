"""MMAudio 16 kHz VAE decoder: audio latents [B, 20, L] -> 80-band log-mel [B, 80, 2L], with magnitude-
preserving convs folded once at load (``fold_mp_weight``) and a mid attention over the whole sequence (not
causal). Names are the checkpoint's. Layout: ``docs/ARCHITECTURE.md``, "Audio decoders".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hallolive_rt.weights import CheckpointError, assign_state_dict, read_checkpoint

__all__ = ["MMAudioVAEConfig", "AudioVAEDecoder", "fold_mp_weight", "build_audio_decoder", "load_audio_decoder"]

# Per-band statistics of the 80-band training mels (the release's DATA_MEAN_80D / DATA_STD_80D). The
# checkpoint stores them too; these only seed a randomly built decoder so its mels have realistic range.
_MEL80_MEAN = (
    -1.6058, -1.3676, -1.2520, -1.2453, -1.2078, -1.2224, -1.2419, -1.2439, -1.2922, -1.2927,
    -1.3170, -1.3543, -1.3401, -1.3836, -1.3907, -1.3912, -1.4313, -1.4152, -1.4527, -1.4728,
    -1.4568, -1.5101, -1.5051, -1.5172, -1.5623, -1.5373, -1.5746, -1.5687, -1.6032, -1.6131,
    -1.6081, -1.6331, -1.6489, -1.6489, -1.6700, -1.6738, -1.6953, -1.6969, -1.7048, -1.7280,
    -1.7361, -1.7495, -1.7658, -1.7814, -1.7889, -1.8064, -1.8221, -1.8377, -1.8417, -1.8643,
    -1.8857, -1.8929, -1.9173, -1.9379, -1.9531, -1.9673, -1.9824, -2.0042, -2.0215, -2.0436,
    -2.0766, -2.1064, -2.1418, -2.1855, -2.2319, -2.2767, -2.3161, -2.3572, -2.3954, -2.4282,
    -2.4659, -2.5072, -2.5552, -2.6074, -2.6584, -2.7107, -2.7634, -2.8266, -2.8981, -2.9673,
)
_MEL80_STD = (
    1.0291, 1.0411, 1.0043, 0.9820, 0.9677, 0.9543, 0.9450, 0.9392, 0.9343, 0.9297, 0.9276, 0.9263,
    0.9242, 0.9254, 0.9232, 0.9281, 0.9263, 0.9315, 0.9274, 0.9247, 0.9277, 0.9199, 0.9188, 0.9194,
    0.9160, 0.9161, 0.9146, 0.9161, 0.9100, 0.9095, 0.9145, 0.9076, 0.9066, 0.9095, 0.9032, 0.9043,
    0.9038, 0.9011, 0.9019, 0.9010, 0.8984, 0.8983, 0.8986, 0.8961, 0.8962, 0.8978, 0.8962, 0.8973,
    0.8993, 0.8976, 0.8995, 0.9016, 0.8982, 0.8972, 0.8974, 0.8949, 0.8940, 0.8947, 0.8936, 0.8939,
    0.8951, 0.8956, 0.9017, 0.9167, 0.9436, 0.9690, 1.0003, 1.0225, 1.0381, 1.0491, 1.0545, 1.0604,
    1.0761, 1.0929, 1.1089, 1.1196, 1.1176, 1.1156, 1.1117, 1.1070,
)

_MP_EPS = 1e-4  # EDM2 normalize() epsilon, used by both the weight fold and the per-position pixel norm
_MP_SILU_GAIN = 1.0 / 0.596  # magnitude-preserving SiLU: silu(x) / 0.596
_RES_T = 0.3  # residual blend of every resnet/attention block: lerp(x, h, 0.3), rescaled to unit variance


@dataclass(frozen=True)
class MMAudioVAEConfig:
    """The release's ``VAE(data_dim, embed_dim, hidden_dim)`` plus its fixed ``Decoder1D`` arguments."""

    data_dim: int = 80  # mel bands
    embed_dim: int = 20  # latent channels
    hidden_dim: int = 384
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2  # the decoder uses num_res_blocks + 1 per level
    attn_layers: tuple[int, ...] = (3,)  # levels with attention (none exist at 3 levels: mid only)
    down_layers: tuple[int, ...] = (0,)  # encoder levels that halve time; the decoder doubles after +1
    kernel_size: int = 3
    clip_act: float = 256.0

    @classmethod
    def tiny(cls) -> "MMAudioVAEConfig":
        """Same depth, receptive field and 2x time upsampling; narrow (16/32/64 channels)."""
        return cls(hidden_dim=16)

    @property
    def mel_frames_per_token(self) -> int:
        return 2 ** len(self.down_layers)

    def __post_init__(self) -> None:
        if self.data_dim != len(_MEL80_MEAN):
            raise ValueError(f"only the 16k (80-band) VAE is supported, got data_dim={self.data_dim}")
        if any(i < len(self.ch_mult) for i in self.attn_layers):
            raise ValueError("per-level attention is not used by the released 16k VAE and not implemented")


# ---- magnitude-preserving primitives ---------------------------------------------------------------------

def fold_mp_weight(raw: torch.Tensor) -> torch.Tensor:
    """Raw MPConv weight [out, in, k] -> the plain conv weight the release uses after remove_weight_norm:
    each filter over (its RMS + EDM2's 1e-4) over sqrt(in*k), computed in fp32, returned in ``raw.dtype``."""
    w = raw.to(torch.float32)
    fan_in = w[0].numel()
    rms = torch.linalg.vector_norm(w, dim=tuple(range(1, w.ndim)), keepdim=True) / math.sqrt(fan_in)
    return (w / (rms + _MP_EPS) / math.sqrt(fan_in)).to(raw.dtype)


def _pixel_norm(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Unit-RMS normalisation over ``dim`` (norm taken in fp32, as the release does under bf16)."""
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    return x / (n / math.sqrt(x.shape[dim]) + _MP_EPS).to(x.dtype)


def _mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) * _MP_SILU_GAIN


def _mp_sum(x: torch.Tensor, h: torch.Tensor, t: float = _RES_T) -> torch.Tensor:
    return x.lerp(h, t) / math.sqrt((1 - t) ** 2 + t**2)


class MPConv1d(nn.Module):
    """A bias-free 'same' conv whose ``weight`` is already folded (see ``fold_mp_weight``)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in, T] -> [B, out, T]
        return F.conv1d(x, self.weight, padding=self.weight.shape[-1] // 2)


class ResBlock(nn.Module):
    """pixel-norm -> (mp-SiLU, conv) x2, 1x1 shortcut when widths differ, mp-sum with t=0.3."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.conv1 = MPConv1d(in_dim, out_dim, kernel_size)
        self.conv2 = MPConv1d(out_dim, out_dim, kernel_size)
        if in_dim != out_dim:
            self.nin_shortcut = MPConv1d(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, T] -> [B, C_out, T]
        x = _pixel_norm(x)
        h = self.conv2(_mp_silu(self.conv1(_mp_silu(x))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return _mp_sum(x, h)


class Attention(nn.Module):
    """Single-head self-attention over time with cosine (pixel-normed) q/k/v."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = MPConv1d(dim, 3 * dim, 1)
        self.proj_out = MPConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T]
        b, c, t = x.shape
        # The qkv rows are interleaved per channel (row 3*c + j is channel c of q/k/v for j = 0/1/2).
        y = _pixel_norm(self.qkv(x).view(b, c, 3, t), dim=1)  # [B, C, 3, T]
        q, k, v = (y[:, :, j].transpose(1, 2).unsqueeze(1) for j in range(3))  # [B, 1, T, C]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, 1, T, C]
        return _mp_sum(x, self.proj_out(o.squeeze(1).transpose(1, 2)))


class Upsample(nn.Module):
    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = MPConv1d(dim, dim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T] -> [B, C, 2T]
        # 'nearest-exact' at an integer factor of 2 is a plain repeat of every frame.
        return self.conv(x.repeat_interleave(2, dim=-1))


class _Mid(nn.Module):
    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.block_1 = ResBlock(dim, dim, kernel_size)
        self.attn_1 = Attention(dim)
        self.block_2 = ResBlock(dim, dim, kernel_size)


class _Level(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, n_blocks: int, kernel_size: int, upsample: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * n_blocks
        self.block = nn.ModuleList(ResBlock(dims[i], dims[i + 1], kernel_size) for i in range(n_blocks))
        if upsample:
            self.upsample = Upsample(out_dim, kernel_size)


class Decoder1D(nn.Module):
    def __init__(self, cfg: MMAudioVAEConfig):
        super().__init__()
        self.clip_act = cfg.clip_act
        k = cfg.kernel_size
        widths = [cfg.hidden_dim * m for m in cfg.ch_mult]
        self.conv_in = MPConv1d(cfg.embed_dim, widths[-1], k)
        self.mid = _Mid(widths[-1], k)
        up_levels = {i + 1 for i in cfg.down_layers}
        # up[i] is level i; levels run from the widest (last) to the narrowest (0).
        levels: list[nn.Module] = [nn.Module()] * len(widths)
        block_in = widths[-1]
        for i in reversed(range(len(widths))):
            levels[i] = _Level(block_in, widths[i], cfg.num_res_blocks + 1, k, i in up_levels)
            block_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.conv_out = MPConv1d(widths[0], cfg.data_dim, k)
        self.learnable_gain = nn.Parameter(torch.zeros(()))  # conv_out is scaled by (1 + gain)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, E, L] -> normalised mel [B, D, 2L]
        c = self.clip_act
        h = self.mid.block_1(self.conv_in(z))
        h = self.mid.block_2(self.mid.attn_1(h)).clamp(-c, c)
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h).clamp(-c, c)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        # conv_out has no bias, so scaling its output equals the release's scaling of its weight.
        return self.conv_out(_mp_silu(h)) * (self.learnable_gain + 1)


class AudioVAEDecoder(nn.Module):
    """Latents [B, 20, L] (channel-first, as the release transposes them) -> log-mel [B, 80, 2L]."""

    def __init__(self, cfg: MMAudioVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("data_mean", torch.tensor(_MEL80_MEAN, dtype=torch.float32).view(1, -1, 1))
        self.register_buffer("data_std", torch.tensor(_MEL80_STD, dtype=torch.float32).view(1, -1, 1))
        self.decoder = Decoder1D(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, E, L] -> [B, D, 2L]
        mel = self.decoder(z)
        return mel * self.data_std.to(mel.dtype) + self.data_mean.to(mel.dtype)


# ---- builders / loaders ----------------------------------------------------------------------------------

def _mp_weight_names(module: AudioVAEDecoder) -> list[str]:
    return [f"{n}.weight" for n, m in module.named_modules() if isinstance(m, MPConv1d)]


def build_audio_decoder(cfg: MMAudioVAEConfig, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> AudioVAEDecoder:
    """A randomly initialised decoder (raw N(0,1) weights folded as a loaded file would be)."""
    with torch.device(device):
        m = AudioVAEDecoder(cfg)
    with torch.no_grad():
        for name in _mp_weight_names(m):
            p = m.get_parameter(name)
            p.copy_(fold_mp_weight(torch.randn_like(p, dtype=torch.float32)))
        m.decoder.learnable_gain.zero_()
    return m.to(dtype).eval().requires_grad_(False)


def load_audio_decoder(path: str | os.PathLike, cfg: MMAudioVAEConfig | None = None,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       *, raw_mp_weights: bool = True) -> AudioVAEDecoder:
    """Load the decoder half of MMAudio ``ext_weights/v1-16.pth``, its raw MP weights folded once in fp32
    (``raw_mp_weights=False``: a file saved from an already-folded module)."""
    cfg = cfg or MMAudioVAEConfig()
    obj = read_checkpoint(path)
    for nest in ("state_dict", "model"):
        if nest in obj and isinstance(obj[nest], dict):
            obj = obj[nest]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and not k.startswith("encoder.")}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors outside 'encoder.*'; expected the MMAudio VAE "
                              f"(data_mean, data_std, decoder.*)")
    with torch.device("meta"):
        m = AudioVAEDecoder(cfg)
    if raw_mp_weights:
        for name in _mp_weight_names(m):
            if name in sd:
                sd[name] = fold_mp_weight(sd[name].to(torch.float32))
    assign_state_dict(m, sd, path, dtype=dtype, device=device, what="MMAudio 16k VAE decoder")
    return m.eval().requires_grad_(False)
