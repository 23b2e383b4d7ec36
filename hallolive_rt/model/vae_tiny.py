"""Tiny preview video decoder for the Wan2.2 48-channel latent (the TAEHV architecture: 2-D convs, one frame
of memory per MemBlock, TGrow for time and nearest upsampling for space), with the contract of
``WanVideoDecoder``: ``new_state`` gives static buffers (each MemBlock's input at the previous frame, at that
block's frame rate and resolution), ``decode_frame`` reads and rewrites them in place, one latent frame in and
1 (``first``) or 4 pixel frames out in [-1, 1], so the steady variant can be compiled or captured once. It
loads the released ``taew2_2`` and ``lighttaew2_2`` files (128 tensors, ``encoder.N.*`` and ``decoder.N.*``;
the encoder is ignored); the two expect different latents, so the variant is always named by the caller."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hallolive_rt.model.vae_video import LatentStatsDecoder, latent_stats
from hallolive_rt.state import DecoderState
from hallolive_rt.weights import CheckpointError, assign_state_dict, materialize_non_persistent, read_checkpoint

__all__ = ["VARIANTS", "TinyDecoderConfig", "TinyDecodeState", "TinyVideoDecoder", "build_tiny_decoder",
           "load_tiny_decoder", "decoder_parameter_count"]

# Facts of the public releases this decoder follows (source and place named):
# * madebyollin/taehv, taehv.py (class TAEHV; https://github.com/madebyollin/taehv/blob/main/taehv.py): a
#   "taew2_2" file means patch size 2 and 48 latent channels; decoder widths (256, 128, 64, 64) and
#   decoder_time_upscale (False, True, True). The decoder is one nn.Sequential, so file keys are
#   ``decoder.<index>.*``: 3*tanh(x/3), conv3x3 z->w0, ReLU, then per stage three MemBlocks, nearest 2x
#   upsample, TGrow, conv3x3 without bias to the next width; then ReLU, conv3x3 to 3*p*p and pixel shuffle;
#   output clamped to [0, 1]. MemBlock(x, past) = relu(convs(cat(x, past)) + x) with convs conv3x3(2C->C),
#   ReLU, conv3x3, ReLU, conv3x3; ``past`` is the block's input at the previous frame, zeros before the first.
#   TGrow is a bias-free 1x1 conv C -> stride*C whose channel chunk j becomes frame j. decode_video drops the
#   first 2**sum(time_upscale) - 1 = 3 frames. ``patch_tgrow_layers`` keeps the LAST rows of a file's TGrow
#   weight that is wider than the model's.
# * TAEHV README (https://github.com/madebyollin/taehv#readme): "TAEHV does not use any latent scales / shifts"
#   and stores video in [0, 1], NTCHW. So taew2_2 decodes the DiT's normalised latent as is.
# * ModelTC/LightX2V (https://github.com/ModelTC/LightX2V): lightx2v/pipeline.py (enable_lightvae) sets
#   need_scaled for a Wan model whose tae_path contains "lighttae"; lightx2v/models/video_encoders/hf/wan/
#   vae_tiny.py (Wan2_2_VAE_tiny.decode) then feeds ``z / (1/std) + mean`` (the Wan2.2 latent statistics) to
#   the same TAEHV decoder (tae.py, model_type "wan22") and maps the output to [-1, 1] with x*2-1.
VARIANTS = ("taew2_2", "lighttaew2_2")
_DENORMALISED = {"taew2_2": False, "lighttaew2_2": True}  # does the variant expect z * std + mean?
_LAYOUT_KEY = re.compile(r"^decoder\.\d+\.")


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape parameters of the released Wan2.2 TAEHV decoder; ``widths`` shrinks it for tests."""

    z_dim: int = 48
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    time_upscale: tuple[bool, bool, bool] = (False, True, True)  # TGrow stride 2 per stage where True
    patch_size: int = 2

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_upscale)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** len(self.time_upscale)  # one 2x upsample per stage, then the pixel shuffle


class TinyDecodeState(DecoderState):
    """``memory[k]`` [B, C_k, H_k, W_k]: MemBlock ``k``'s input at the previous frame of its own frame rate."""

    @property
    def memory(self) -> tuple[torch.Tensor, ...]:
        return self.buffers


class _SoftClamp(nn.Module):
    """3 * tanh(x / 3): keeps the latent inside (-3, 3) without a hard edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _MemBlock(nn.Module):
    """Residual block over the current frame and the previous frame's input (``past``), both [N, C, H, W]."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class _TGrow(nn.Module):
    """[N, C, H, W] -> [N * stride, C, H, W]: output channel chunk j is the j-th new frame."""

    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


def _decoder_layers(cfg: TinyDecoderConfig) -> list[nn.Module]:
    """The released decoder in its file order (the list index is the ``decoder.<index>`` of the keys)."""
    w = cfg.widths
    layers: list[nn.Module] = [_SoftClamp(), nn.Conv2d(cfg.z_dim, w[0], 3, padding=1), nn.ReLU()]
    for s, grow in enumerate(cfg.time_upscale):
        layers += [_MemBlock(w[s]) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _TGrow(w[s], 2 if grow else 1),
                   nn.Conv2d(w[s], w[s + 1], 3, padding=1, bias=False)]
    layers += [nn.ReLU(), nn.Conv2d(w[-1], 3 * cfg.patch_size**2, 3, padding=1)]
    return layers


class TinyVideoDecoder(LatentStatsDecoder):
    """The released TAEHV decoder for Wan2.2 with the streaming contract of ``WanVideoDecoder``. ``variant``
    "lighttaew2_2" de-normalises the latent (z * std + mean, float32) before the first layer; "taew2_2" takes
    it as is. The statistics are non-persistent float32 buffers, never in the file."""

    def __init__(self, cfg: TinyDecoderConfig, variant: str):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"tiny decoder variant {variant!r}: choose one of {', '.join(VARIANTS)} "
                             f"(taew2_2 decodes the DiT latent as is, lighttaew2_2 expects z * std + mean)")
        self.cfg, self.variant = cfg, variant
        self.denormalise = _DENORMALISED[variant]
        self._stats = latent_stats()
        if len(self._stats[0]) != cfg.z_dim:
            raise ValueError(f"z_dim {cfg.z_dim}: the Wan2.2 latent statistics have {len(self._stats[0])} channels")
        self.decoder = nn.Sequential(*_decoder_layers(cfg))
        # Nothing after the last TGrow has memory: the first frame's trimmed frames can be dropped right there.
        self._last_grow = max(i for i, m in enumerate(self.decoder) if isinstance(m, _TGrow))
        self.register_buffer("latent_mean", torch.empty(cfg.z_dim), persistent=False)
        self.register_buffer("latent_std", torch.empty(cfg.z_dim), persistent=False)
        self.init_stats()

    def init_stats(self, device: torch.device | str | None = None) -> None:
        """(Re)create the float32 latent mean and std on ``device`` (default: where the weights are)."""
        device = self.device if device is None else device
        self.latent_mean = torch.tensor(self._stats[0], dtype=torch.float32, device=device)
        self.latent_std = torch.tensor(self._stats[1], dtype=torch.float32, device=device)

    def _anchor(self) -> torch.Tensor:
        return self.decoder[1].weight

    # the compiled region: every MemBlock runs ``region(block, x, past)`` (None: eager)
    region = staticmethod(lambda block, x, past: _MemBlock.forward(block, x, past))

    def set_region_fn(self, fn) -> None:
        for m in self.modules():
            if isinstance(m, _MemBlock):
                if fn is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = functools.partial(fn, m)

    @property
    def spatial_factor(self) -> int:
        return self.cfg.spatial_factor

    @property
    def temporal_factor(self) -> int:
        return self.cfg.temporal_factor

    # ---- state -------------------------------------------------------------------------------------
    def new_state(self, batch: int, latent_h: int, latent_w: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> TinyDecodeState:
        """Zeroed memory for ``batch`` streams of ``latent_h x latent_w`` latents (default: weight dtype/device)."""
        dtype = self.dtype if dtype is None else dtype
        device = self.device if device is None else device
        bufs, scale = [], 1
        for m in self.decoder:
            if isinstance(m, nn.Upsample):
                scale *= 2
            elif isinstance(m, _MemBlock):
                c = m.conv[0].out_channels
                bufs.append(torch.zeros(batch, c, latent_h * scale, latent_w * scale, dtype=dtype, device=device))
        return TinyDecodeState(tuple(bufs))

    # ---- decoding ----------------------------------------------------------------------------------
    def _latent_in(self, z: torch.Tensor) -> torch.Tensor:
        # [B, z, T, h, w] -> [B * T, z, h, w], the frames of one stream consecutive
        if self.denormalise:
            z = z.float() * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        return z.to(self.dtype).permute(0, 2, 1, 3, 4).flatten(0, 1)

    def _run(self, x: torch.Tensor, batch: int, memory: tuple[torch.Tensor, ...] | None, fresh: bool,
             trim: int, write: list | None) -> torch.Tensor:
        """Every layer over [B * m, C, H, W] (m frames per stream, m static); returns [B, 3, m', H', W'].
        Each MemBlock's ``past`` is its own input shifted one frame later, with ``memory[k]`` (or zeros when
        ``fresh``) in front. The block's last input frame goes to ``write`` (a list) or, without one, into
        ``memory[k]`` in place. ``trim`` frames per stream are dropped after the last TGrow."""
        m, k = x.shape[0] // batch, 0
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, _MemBlock):
                xs = x.unflatten(0, (batch, m))  # [B, m, C, H, W]
                before = torch.zeros_like(xs[:, :1]) if fresh else memory[k].unsqueeze(1)
                # cat copies memory[k] before the copy_ below overwrites it (m == 1 reads only memory)
                past = torch.cat([before, xs[:, :-1]], dim=1).flatten(0, 1)
                y = layer(x, past)
                if write is not None:
                    write.append(xs[:, -1])
                elif memory is not None:
                    memory[k].copy_(xs[:, -1])
                x, k = y, k + 1
            else:
                x = layer(x)
                if isinstance(layer, _TGrow):
                    m *= layer.stride
            if i == self._last_grow and trim:
                x, m = x.unflatten(0, (batch, m))[:, trim:].flatten(0, 1), m - trim
        x = F.pixel_shuffle(x, self.cfg.patch_size)  # [B * m, 3, H', W']
        return x.unflatten(0, (batch, m)).transpose(1, 2)

    def _to_range(self, x: torch.Tensor, clamp: bool) -> torch.Tensor:
        # The release's [0, 1] (clamped) to the runtime's [-1, 1]
        return (x.clamp(0, 1) if clamp else x) * 2 - 1

    def _frame(self, z: torch.Tensor, memory: tuple[torch.Tensor, ...], first: bool, write: list | None,
               clamp: bool) -> torch.Tensor:
        ref = memory[0]
        if z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] != 1 or z.shape[0] != ref.shape[0] \
                or z.shape[-2:] != ref.shape[-2:]:
            raise ValueError(f"decode_frame: z {tuple(z.shape)} does not fit a state made for "
                             f"[{ref.shape[0]}, {self.z_dim}, 1, {ref.shape[-2]}, {ref.shape[-1]}]")
        x = self._run(self._latent_in(z), z.shape[0], memory, first, self.temporal_factor - 1 if first else 0, write)
        return self._to_range(x, clamp)

    def decode_frame(self, z: torch.Tensor, state: TinyDecodeState, first: bool, *, clamp: bool = True
                     ) -> torch.Tensor:
        """z [B, z_dim, 1, h, w] -> frames [B, 3, n, 16h, 16w] (n = 1 if ``first`` else 4); updates ``state``.
        ``first`` starts from zero memory (no reset needed) and keeps only the last of the 4 frames."""
        return self._frame(z, state.memory, first, None, clamp)

    def decode_frame_functional(self, z: torch.Tensor, memory: tuple[torch.Tensor, ...], first: bool, *,
                                clamp: bool = True) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``decode_frame`` without mutation: returns (frames, next memory), same shapes as ``memory``."""
        new: list[torch.Tensor] = []
        return self._frame(z, memory, first, new, clamp), tuple(new)

    @torch.no_grad()
    def decode_full(self, z: torch.Tensor, *, clamp: bool = True, parallel: bool = False) -> torch.Tensor:
        """A whole clip [B, z_dim, T, h, w] -> [B, 3, 1 + 4(T-1), 16h, 16w], by default frame by frame over a
        fresh state (the kernels streaming runs, so any block split equals it exactly). ``parallel`` runs all
        T frames through each layer at once: faster offline, equal up to the convs' batch-size-dependent
        rounding (about 1e-5 in float32)."""
        if not parallel:
            return self.decode_block(z, self.new_state(z.shape[0], z.shape[-2], z.shape[-1]), True, clamp=clamp)
        x = self._run(self._latent_in(z), z.shape[0], None, True, self.temporal_factor - 1, None)
        return self._to_range(x, clamp)


def decoder_parameter_count(cfg: TinyDecoderConfig | None = None) -> int:
    """Parameters of the decoder (9,923,532 at full size), counted on the meta device."""
    return sum(p.numel() for p in build_tiny_decoder(cfg=cfg, device="meta").parameters())


def build_tiny_decoder(variant: str = "taew2_2", device: torch.device | str = "meta", *,
                       widths: tuple[int, ...] | None = None, cfg: TinyDecoderConfig | None = None
                       ) -> TinyVideoDecoder:
    """The decoder with random weights on ``device`` (``"meta"``: shapes only, for loading or counting);
    ``widths`` (four ints) narrows every stage, for tests; ``cfg`` gives the whole configuration instead."""
    if cfg is None:
        cfg = TinyDecoderConfig() if widths is None else TinyDecoderConfig(widths=tuple(widths))
    elif widths is not None:
        raise ValueError("build_tiny_decoder: pass widths or cfg, not both")
    with torch.device(device):
        return TinyVideoDecoder(cfg, variant)


def _refuse_other_layout(path, raw: dict, dec: dict) -> None:
    """A file without the released ``decoder.<index>.*`` keys (e.g. a full Wan2.2 VAE) is not this model."""
    foreign = [k for k in dec if not _LAYOUT_KEY.match(k)]
    if dec and not foreign:
        return
    shown = foreign or list(raw)
    listing = ", ".join(repr(k) for k in shown[:5]) + (f" ... and {len(shown) - 5} more" if len(shown) > 5 else "")
    found = f"{len(foreign)} decoder keys of another layout" if foreign else f"no 'decoder.*' keys among {len(raw)}"
    hint = (" Keys like 'decoder.conv1.weight' or 'conv2.weight' are the full Wan2.2 VAE's: decode with it "
            "(--video-decoder full)." if any(k.startswith(("decoder.conv", "conv2.")) for k in raw) else "")
    raise CheckpointError(
        f"{path}: not a TAEHV (taew2_2 / lighttaew2_2) checkpoint: expected 64 tensors 'decoder.<index>.*' "
        f"(e.g. 'decoder.1.weight', 'decoder.3.conv.0.weight'), found {found}: {listing}.{hint} Use the released "
        f"taew2_2 file (github.com/madebyollin/taehv) or lighttaew2_2 (huggingface.co/lightx2v/Autoencoders)."
    )


def _narrow_tgrow(model: TinyVideoDecoder, sd: dict[str, torch.Tensor]) -> None:
    """Keep the last rows of a TGrow weight wider than the model's (a stride-2 weight for a stride-1 TGrow)."""
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if not isinstance(layer, _TGrow) or key not in sd:
            continue
        want, got = layer.conv.weight.shape[0], sd[key].shape[0]
        if got > want and got % want == 0 and tuple(sd[key].shape[1:]) == tuple(layer.conv.weight.shape[1:]):
            sd[key] = sd[key][-want:].clone()


def load_tiny_decoder(path: str | os.PathLike, variant: str = "taew2_2", dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", *, widths: tuple[int, ...] | None = None
                      ) -> TinyVideoDecoder:
    """Load ``decoder.*`` from a released TAEHV file (``.pth`` or ``.safetensors``; mmap + assign), dropping
    ``encoder.*``. ``variant`` says which latent the weights expect (module docstring); it cannot be read from
    the file. Wrong layouts, missing keys and wrong shapes raise ``CheckpointError``."""
    if variant not in VARIANTS:
        raise ValueError(f"tiny decoder variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    raw = read_checkpoint(path)
    dec = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor) and k.startswith("decoder.")}
    _refuse_other_layout(path, raw, dec)
    model = build_tiny_decoder(variant, device="meta", widths=widths)
    _narrow_tgrow(model, dec)
    assign_state_dict(model, dec, path, dtype=dtype, device=device,
                      what=f"{variant} decoder (decoder.<index>.*, widths {model.cfg.widths})")
    materialize_non_persistent(model, TinyVideoDecoder.init_stats, device)
    return model.eval().requires_grad_(False)
