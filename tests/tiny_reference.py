"""A plain reference for the tiny preview decoder (tests only): the released TAEHV key layout with its shapes
(encoder included, so fake files look like the real ones), random weights in that layout, and a whole-clip
decode written with obvious per-frame loops and functional ops straight from a state dict. It shares no
code with hallolive_rt/model/vae_tiny.py: the layer order is spelled out here a second time from the public
description of the architecture, spatial upsampling is repeat_interleave and the pixel shuffle is explicit
strided writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FULL_WIDTHS = (256, 128, 64, 64)
TIME_UPSCALE = (False, True, True)
ENCODER_TIME_DOWNSCALE = (True, True, False)  # the released encoder's TPool strides 2, 2, 1
Z_DIM, PATCH = 48, 2


def _mem_shapes(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.0.weight": (c, 2 * c, 3, 3), f"{prefix}.conv.0.bias": (c,),
            f"{prefix}.conv.2.weight": (c, c, 3, 3), f"{prefix}.conv.2.bias": (c,),
            f"{prefix}.conv.4.weight": (c, c, 3, 3), f"{prefix}.conv.4.bias": (c,)}


def decoder_kinds() -> list[str]:
    """The decoder's layer kinds by index: the ``decoder.<index>`` of the file."""
    kinds = ["clamp", "conv", "relu"]
    for _ in range(3):
        kinds += ["mem", "mem", "mem", "up", "grow", "conv_nobias"]
    return kinds + ["relu", "conv"]


def released_shapes(widths=FULL_WIDTHS, enc_width: int = 64, wide_grow: tuple[int, ...] = ()
                    ) -> dict[str, tuple[int, ...]]:
    """Every key of a released file with its shape. ``wide_grow``: decoder indices whose TGrow weight the
    file stores at twice the rows the configuration uses (the model keeps the last rows)."""
    out: dict[str, tuple[int, ...]] = {}
    e = enc_width
    # encoder: conv, relu, then 3 x (tpool, strided conv, 3 memblocks), conv to the latent
    out["encoder.0.weight"], out["encoder.0.bias"] = (e, 3 * PATCH * PATCH, 3, 3), (e,)
    i = 2
    for down in ENCODER_TIME_DOWNSCALE:
        out[f"encoder.{i}.conv.weight"] = (e, e * (2 if down else 1), 1, 1)
        out[f"encoder.{i + 1}.weight"] = (e, e, 3, 3)
        for j in range(3):
            out.update(_mem_shapes(f"encoder.{i + 2 + j}", e))
        i += 5
    out[f"encoder.{i}.weight"], out[f"encoder.{i}.bias"] = (Z_DIM, e, 3, 3), (Z_DIM,)
    # decoder
    stage, c = -1, widths[0]
    for idx, kind in enumerate(decoder_kinds()):
        key = f"decoder.{idx}"
        if kind == "conv" and idx == 1:
            out[f"{key}.weight"], out[f"{key}.bias"] = (widths[0], Z_DIM, 3, 3), (widths[0],)
        elif kind == "mem":
            if idx in (3, 9, 15):
                stage += 1
                c = widths[stage]
            out.update(_mem_shapes(key, c))
        elif kind == "grow":
            rows = c * (2 if TIME_UPSCALE[stage] else 1) * (2 if idx in wide_grow else 1)
            out[f"{key}.conv.weight"] = (rows, c, 1, 1)
        elif kind == "conv_nobias":
            out[f"{key}.weight"] = (widths[stage + 1], c, 3, 3)
        elif kind == "conv":
            out[f"{key}.weight"], out[f"{key}.bias"] = (3 * PATCH * PATCH, widths[3], 3, 3), (3 * PATCH * PATCH,)
    return out


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """He-scaled random weights and small random biases, scaled so a decode looks like a picture: each
    MemBlock's last conv at 0.3 (the residual stack would otherwise grow the activations block by block)
    and the output conv at 0.1 with a bias of 0.5, so pixels spread over [0, 1] with few clamped (~6 %)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if len(shape) == 1:
            sd[k] = torch.randn(shape, generator=g) * 0.05
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        if k.startswith("decoder.") and k.endswith("conv.4.weight"):
            sd[k] *= 0.3
    last = f"decoder.{len(decoder_kinds()) - 1}"
    sd[f"{last}.weight"] *= 0.1
    sd[f"{last}.bias"] += 0.5
    return sd


def _conv(sd, key, x, bias=True):
    w = sd[f"{key}.weight"]
    b = sd[f"{key}.bias"] if bias else None
    return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def reference_decode(sd: dict[str, torch.Tensor], z: torch.Tensor, *, denormalise: bool = False,
                     mean=None, std=None, clamp: bool = True) -> torch.Tensor:
    """z [B, 48, T, h, w] -> [B, 3, 1 + 4(T-1), 16h, 16w] in [-1, 1], in float32, one frame at a time."""
    sd = {k: v.float() for k, v in sd.items() if k.startswith("decoder.")}
    z = z.float()
    if denormalise:
        z = z * torch.tensor(std).view(1, -1, 1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1, 1)
    frames = [z[:, :, t] for t in range(z.shape[2])]
    for idx, kind in enumerate(decoder_kinds()):
        key = f"decoder.{idx}"
        if kind == "clamp":
            frames = [3 * torch.tanh(f / 3) for f in frames]
        elif kind == "relu":
            frames = [torch.relu(f) for f in frames]
        elif kind in ("conv", "conv_nobias"):
            frames = [_conv(sd, key, f, bias=kind == "conv") for f in frames]
        elif kind == "up":
            frames = [f.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) for f in frames]
        elif kind == "mem":
            out, previous = [], None
            for f in frames:
                past = torch.zeros_like(f) if previous is None else previous
                h = torch.relu(_conv(sd, f"{key}.conv.0", torch.cat([f, past], dim=1)))
                h = torch.relu(_conv(sd, f"{key}.conv.2", h))
                h = _conv(sd, f"{key}.conv.4", h)
                out.append(torch.relu(h + f))
                previous = f
            frames = out
        elif kind == "grow":
            c = frames[0].shape[1]
            stride = 2 if TIME_UPSCALE[(idx - 7) // 6] else 1
            w = sd[f"{key}.conv.weight"][-stride * c:]  # a wider file weight: its last rows
            out = []
            for f in frames:
                y = F.conv2d(f, w)
                out += [y[:, j * c:(j + 1) * c] for j in range(stride)]
            frames = out
    frames = frames[3:]  # the first latent frame's first 3 frames are not part of the clip
    pixels = []
    for f in frames:
        b, _, h, w = f.shape
        img = torch.empty(b, 3, h * PATCH, w * PATCH)
        for c in range(3):
            for r in range(PATCH):
                for q in range(PATCH):
                    img[:, c, r::PATCH, q::PATCH] = f[:, c * PATCH * PATCH + r * PATCH + q]
        img = img.clamp(0, 1) if clamp else img
        pixels.append(img * 2 - 1)
    return torch.stack(pixels, dim=2)
