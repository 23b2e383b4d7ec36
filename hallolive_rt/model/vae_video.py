"""Wan2.2 video VAE decoder (z_dim 48, 4x16x16), streamed one latent frame at a time: z [B, 48, T, h, w]
-> frames [B, 3, 1 + 4(T-1), 16h, 16w] in [-1, 1]. The causal convs' history lives in a preallocated
``VideoDecodeState`` updated in place, so ``decode_frame(first=False)`` has one shape and can be captured;
the encoder is not built. The state, the first-frame variant and the de-normalisation modes:
``docs/ARCHITECTURE.md``, "The video decoder"."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hallolive_rt.model.vae_video_blocks import CACHE_T, CausalConv3d, Decoder3d, ResidualBlock
from hallolive_rt.state import DecoderState
from hallolive_rt.weights import CheckpointError, assign_state_dict, materialize_non_persistent, read_checkpoint

__all__ = ["STATS_MODES", "WanVAEConfig", "VideoDecodeState", "WanVideoDecoder", "build_video_decoder",
           "load_video_decoder"]

_STATS_FILE = Path(__file__).with_name("wan22_latent_stats.json")


def latent_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The Wan2.2 latent (mean, std) as float constants (wan22_latent_stats.json)."""
    data = json.loads(_STATS_FILE.read_text())
    return tuple(data["mean"]), tuple(data["std"])
STATS_MODES = ("release", "fp32")  # dtype of the latent statistics and of the de-normalisation (module doc)
_KEEP_PREFIXES = ("decoder.", "conv2.")


@dataclass(frozen=True)
class WanVAEConfig:
    """Constructor parameters of the release's ``WanVAE_`` as ``Wan2_2_VAE`` builds it; ``dim`` (the encoder
    width) is kept for the schema only: nothing here builds the encoder."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2  # pixel patchify, hard-coded in the release's encode/decode

    @classmethod
    def tiny(cls) -> "WanVAEConfig":
        """Same structure and 4x16x16 factors, narrow layers (decoder widths 64/64/64/32/16)."""
        return cls(dim=16, dec_dim=16)

    @classmethod
    def from_profile(cls, profile) -> "WanVAEConfig":
        """The config named by a profile's ``decoders`` field ("full" or "tiny")."""
        return cls.tiny() if profile.decoders == "tiny" else cls()

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(self.temperal_downsample[::-1])

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    def pixel_frames(self, latent_frames: int, *, first: bool) -> int:
        """Frames out of ``latent_frames`` latents; the stream's first latent frame gives 1."""
        return self.temporal_factor * latent_frames - (self.temporal_factor - 1 if first else 0)


class VideoDecodeState(DecoderState):
    """Causal history of the decoder: ``history[i]`` [B, C_i, 2, h_i, w_i] feeds cached conv ``i``, in the
    release's call order (its ``feat_idx``)."""

    @property
    def history(self) -> tuple[torch.Tensor, ...]:
        return self.buffers


def _causal(buf: torch.Tensor, x: torch.Tensor, first: bool) -> torch.Tensor:
    """``x`` with its causal past prepended; the past becomes ``x``'s last frames (in place)."""
    # Nothing precedes the first frame: the release zero-pads, i.e. a zero history.
    xc = F.pad(x, (0, 0, 0, 0, CACHE_T, 0)) if first else torch.cat([buf, x], dim=2)
    buf.copy_(xc[:, :, -CACHE_T:])
    return xc


class BlockHistory:
    """The history of one residual block: its two cached convs' buffers in call order. A compiled region
    sees tensors and the first-frame flag, never a cache index, so one graph serves every same-shaped block."""

    def __init__(self, buffers: tuple[torch.Tensor, torch.Tensor], first: bool):
        self.buffers, self.first, self.n = buffers, first, 0

    def causal_input(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[self.n]
        self.n += 1
        return _causal(buf, x, self.first)


def _through_region(block: ResidualBlock, fn, x: torch.Tensor, hist) -> torch.Tensor:
    if isinstance(hist, _StaticHistory):
        return fn(block, x, hist.for_block(block))
    return ResidualBlock.forward(block, x, hist)  # the functional and release histories stay eager


class _StaticHistory:
    """``History`` over preallocated buffers; ``first`` selects the first-frame code path."""

    def __init__(self, buffers: tuple[torch.Tensor, ...], first: bool):
        self.buffers, self.first = buffers, first

    def causal_input(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        return _causal(self.buffers[conv.cache_index], x, self.first)

    def for_block(self, block: ResidualBlock) -> "BlockHistory":
        r = block.residual
        return BlockHistory((self.buffers[r[2].cache_index], self.buffers[r[6].cache_index]), self.first)

    def skip_time_conv(self, conv: CausalConv3d) -> bool:
        if self.first:
            # Release: the slot becomes "Rep", which later reads as two zero frames.
            self.buffers[conv.cache_index].zero_()
        return self.first


class _FunctionalHistory:
    """``History`` that returns the next history instead of writing it (for exporters without mutation)."""

    def __init__(self, buffers: tuple[torch.Tensor, ...], first: bool):
        self.buffers, self.first = buffers, first
        self.new: list[torch.Tensor | None] = [None] * len(buffers)  # fixed length, filled once per slot

    def causal_input(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[conv.cache_index]
        xc = F.pad(x, (0, 0, 0, 0, CACHE_T, 0)) if self.first else torch.cat([buf, x], dim=2)
        self.new[conv.cache_index] = xc[:, :, -CACHE_T:]
        return xc

    def skip_time_conv(self, conv: CausalConv3d) -> bool:
        if self.first:
            self.new[conv.cache_index] = torch.zeros_like(self.buffers[conv.cache_index])
        return self.first


class _ReleaseHistory:
    """The release's cache list, kept as the reference: entries go None -> "Rep" or a 1-frame tensor
    -> a 2-frame tensor, and a running index (reset per frame) picks the slot."""

    def __init__(self, n: int):
        self.feat: list = [None] * n
        self.idx, self.first = 0, True

    def _slot(self, conv: CausalConv3d) -> int:
        i, self.idx = self.idx, self.idx + 1
        assert i == conv.cache_index, f"call order {i} != slot {conv.cache_index}"
        return i

    def causal_input(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        i = self._slot(conv)
        prev = self.feat[i]
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T and prev is not None:
            last = torch.zeros_like(keep) if isinstance(prev, str) else prev[:, :, -1:]
            keep = torch.cat([last, keep], dim=2)
        self.feat[i] = keep
        xc = x if prev is None or isinstance(prev, str) else torch.cat([prev, x], dim=2)
        return F.pad(xc, (0, 0, 0, 0, CACHE_T - (xc.shape[2] - x.shape[2]), 0))

    def skip_time_conv(self, conv: CausalConv3d) -> bool:
        if self.feat[conv.cache_index] is None:
            self.feat[self._slot(conv)] = "Rep"
            return True
        return False


class LatentStatsDecoder(nn.Module):
    """A video decoder whose latent statistics are constants ``init_stats`` builds from float32 values: any
    cast or move of the module rebuilds them where they went (a cast never rounds them twice). ``dtype`` and
    ``device`` are those of the weight ``_anchor()`` returns."""

    def _anchor(self) -> torch.Tensor:
        raise NotImplementedError

    def init_stats(self, device: torch.device | str | None = None) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.init_stats(self.latent_mean.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor().dtype

    @property
    def device(self) -> torch.device:
        return self._anchor().device

    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    def decode_block(self, z: torch.Tensor, state: DecoderState, first_block: bool, *, clamp: bool = True
                     ) -> torch.Tensor:
        """z [B, z_dim, T, h, w] -> [B, 3, 4T (- 3 if ``first_block``), 16h, 16w], one latent frame at a time."""
        out = [self.decode_frame(z[:, :, i:i + 1], state, first_block and i == 0, clamp=clamp)
               for i in range(z.shape[2])]
        return torch.cat(out, dim=2)


class WanVideoDecoder(LatentStatsDecoder):
    """``conv2`` + ``decoder`` of the release's ``WanVAE_``; latent mean and 1/std as non-persistent buffers
    in the dtype ``stats`` names (``docs/ARCHITECTURE.md``, "The video decoder")."""

    def __init__(self, cfg: WanVAEConfig, stats: str = "release"):
        super().__init__()
        self.cfg, self._stats = cfg, latent_stats()
        if cfg.z_dim != len(self._stats[0]):
            raise ValueError(f"z_dim {cfg.z_dim}: the released latent statistics have {len(self._stats[0])} channels")
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg.dec_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.temperal_upsample,
                                 out_channels=3 * cfg.patch_size**2)
        self.register_buffer("latent_mean", torch.empty(cfg.z_dim), persistent=False)
        self.register_buffer("latent_inv_std", torch.empty(cfg.z_dim), persistent=False)
        self.set_stats(stats)

    def init_stats(self, device: torch.device | str | None = None) -> None:
        """(Re)create mean and 1/std on ``device`` (default: the weights' device) from the float32 constants,
        rounded once to the dtype ``self.stats`` asks for (the weights' dtype for "release")."""
        dtype = torch.float32 if self.stats == "fp32" else self.conv2.weight.dtype
        device = self.conv2.weight.device if device is None else device
        mean = torch.tensor(self._stats[0], dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self._stats[1], dtype=torch.float32, device=device)  # the release's scale[1]
        self.latent_mean, self.latent_inv_std = mean.to(dtype), inv_std.to(dtype)

    def set_stats(self, stats: str) -> "WanVideoDecoder":
        """Switch between the release's de-normalisation ("release") and float32 statistics ("fp32")."""
        if stats not in STATS_MODES:
            raise ValueError(f"stats {stats!r}: choose one of {', '.join(STATS_MODES)}")
        self.stats = stats
        self.init_stats(self.latent_mean.device)
        return self

    def _anchor(self) -> torch.Tensor:
        return self.conv2.weight

    # the compiled region: every residual block runs ``region(block, x, BlockHistory)`` (None: eager)
    region = staticmethod(ResidualBlock.forward)

    def set_region_fn(self, fn) -> None:
        for m in self.decoder.modules():
            if isinstance(m, ResidualBlock):
                if fn is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = functools.partial(_through_region, m, fn)

    # ---- state -------------------------------------------------------------------------------------
    def new_state(self, batch: int, latent_h: int, latent_w: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> VideoDecodeState:
        """Zeroed history for ``batch`` streams of ``latent_h x latent_w`` latents (default: weight dtype/device)."""
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else device
        return VideoDecodeState(tuple(
            torch.zeros(batch, c.in_channels, CACHE_T, latent_h * c.cache_scale, latent_w * c.cache_scale,
                        dtype=dtype, device=device)
            for c in self.decoder.cached_convs
        ))

    # ---- decoding ----------------------------------------------------------------------------------
    def _unnormalize(self, z: torch.Tensor) -> torch.Tensor:  # [B, z, T, h, w]
        # z / (1/std) + mean in the statistics' dtype: bf16 under "release" with bf16 weights (module doc)
        z = z.to(self.latent_inv_std.dtype) / self.latent_inv_std.view(1, -1, 1, 1, 1) \
            + self.latent_mean.view(1, -1, 1, 1, 1)
        return self.conv2(z.to(self.conv2.weight.dtype))

    def _to_pixels(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        # [B, 3*p*p, n, h, w] -> [B, 3, n, p*h, p*w]
        b, _, n, h, w = x.shape
        p = self.cfg.patch_size
        # The channel index is c*p*p + r*p + q, with q the row offset and r the column offset.
        x = x.reshape(b, 3, p, p, n, h, w).permute(0, 1, 4, 5, 3, 6, 2).reshape(b, 3, n, h * p, w * p)
        return x.clamp(-1.0, 1.0) if clamp else x

    def decode_frame(self, z: torch.Tensor, state: VideoDecodeState, first: bool, *, clamp: bool = True
                     ) -> torch.Tensor:
        """z [B, z_dim, 1, h, w] -> frames [B, 3, n, 16h, 16w] (n = 1 if ``first`` else 4); updates ``state``.
        ``clamp=False`` returns the decoder's values before the release's clamp to [-1, 1] (diagnosis)."""
        ref = state.history[0]
        if z.shape[2] != 1 or z.shape[0] != ref.shape[0] or z.shape[-2:] != ref.shape[-2:]:
            raise ValueError(f"decode_frame: z {tuple(z.shape)} does not fit a state made for {tuple(ref.shape)}")
        return self._to_pixels(self.decoder(self._unnormalize(z), _StaticHistory(state.history, first)), clamp)

    def decode_frame_functional(self, z: torch.Tensor, history: tuple[torch.Tensor, ...], first: bool, *,
                                clamp: bool = True) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``decode_frame`` without mutation: returns (frames, next history), same shapes as ``history``,
        for exporters (ONNX/TensorRT) that need the state as explicit inputs and outputs."""
        hist = _FunctionalHistory(history, first)
        frames = self._to_pixels(self.decoder(self._unnormalize(z), hist), clamp)
        return frames, tuple(hist.new)

    @torch.no_grad()
    def decode_full(self, z: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Reference: a whole clip the release's way (conv2 on all frames, then per frame with its cache list)."""
        x = self._unnormalize(z)
        hist, out = _ReleaseHistory(len(self.decoder.cached_convs)), []
        for i in range(x.shape[2]):
            hist.idx, hist.first = 0, i == 0
            out.append(self.decoder(x[:, :, i:i + 1], hist))
        return self._to_pixels(torch.cat(out, dim=2), clamp)


def build_video_decoder(cfg: WanVAEConfig | None = None, device: torch.device | str = "meta", *,
                        stats: str = "release") -> WanVideoDecoder:
    """The decoder with random weights on ``device`` (``"meta"``: shapes only, for loading or counting).
    The latent statistics are real values on every device but ``"meta"``; ``stats`` as in the module doc."""
    with torch.device(device):
        return WanVideoDecoder(cfg or WanVAEConfig(), stats)


def load_video_decoder(path: str | os.PathLike, cfg: WanVAEConfig | None = None, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", *, stats: str = "release") -> WanVideoDecoder:
    """Load ``decoder.*`` and ``conv2.*`` from the release's flat ``Wan2.2_VAE.pth`` (mmap + assign)."""
    raw = read_checkpoint(path)
    sd = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor) and k.startswith(_KEEP_PREFIXES)}
    if not any(k.startswith("decoder.") for k in sd):
        sample = ", ".join(repr(k) for k in list(raw)[:5])
        raise CheckpointError(f"{path}: no 'decoder.*' keys, so this is not a Wan2.2 VAE checkpoint with a "
                              f"decoder ({len(raw)} entries, e.g. {sample}). Expected the official "
                              "Wan2.2_VAE.pth.")
    model = build_video_decoder(cfg, device="meta", stats=stats)
    assign_state_dict(model, sd, path, dtype=dtype, device=device, what="Wan2.2 VAE decoder (decoder.*, conv2.*)")
    materialize_non_persistent(model, WanVideoDecoder.init_stats, device)
    return model.eval().requires_grad_(False)
