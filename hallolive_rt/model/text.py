"""umT5-XXL text encoder as the release runs it: (ids, mask) [B, text_len] -> ctx [B, text_len, 4096],
zero past the prompt, written from Wan's ``T5Encoder`` formula with Wan's checkpoint names, so
``models_t5_umt5-xxl-enc-bf16.pth`` loads with no key map. The formula: ``docs/ARCHITECTURE.md``, "The
text encoder".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hallolive_rt.model.text_tokenizer import ByteTokenizer, TokenizedPrompts
from hallolive_rt.weights import assign_state_dict, read_checkpoint, strip_and_select

__all__ = ["UMT5Config", "TextEncoder", "relative_position_buckets", "build_text_encoder", "random_text_values",
           "load_text_encoder", "encode_prompt", "release_text_encoder"]


@dataclass(frozen=True)
class UMT5Config:
    """The release's ``T5Encoder`` (``umt5_xxl(encoder_only=True)``) parameters; ``text_len`` is the
    tokenizer's fixed length (512), the static sequence length of every call."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    text_len: int = 512
    eps: float = 1e-6
    max_dist: int = 128

    def __post_init__(self):
        if self.shared_pos:
            raise ValueError("umT5 uses one relative-position table per layer (shared_pos=False)")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def tiny(cls) -> UMT5Config:
        """CPU-sized encoder for the tiny preset (byte tokenizer, profiles/tiny.toml text_dim 64)."""
        return cls(vocab=ByteTokenizer.VOCAB_SIZE, dim=64, dim_attn=64, dim_ffn=160, num_heads=2, num_layers=2)


def relative_position_buckets(length: int, num_buckets: int, max_dist: int, device=None) -> torch.Tensor:
    """Bucket of key position j seen from query i, [L, L] int32 (bidirectional T5 bucketing: half the
    buckets for j > i; short distances exact, longer ones log-spaced up to ``max_dist``)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [Lq, Lk] key - query
    half = num_buckets // 2
    exact = half // 2
    side = (rel > 0).to(torch.int64) * half
    dist = rel.abs()
    # clamp only keeps log() finite where the exact branch is taken anyway
    far = exact + (
        torch.log(dist.clamp(min=1).float() / exact) / math.log(max_dist / exact) * (half - exact)
    ).to(torch.int64)
    far = far.clamp(max=half - 1)
    # int32: an index for the bias lookup; exported graphs fold this [L, L] table into a constant, and
    # TensorRT wants index constants in int32
    return (side + torch.where(dist < exact, dist, far)).to(torch.int32)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # the release clamps fp16 activations only when one overflowed; torch.where keeps it sync-free
    if x.dtype != torch.float16:
        return x
    c = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isinf(x).any(), x.clamp(-c, c), x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the input dtype; the product is cast to the weight dtype before scaling
        y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)


class RelativeBias(nn.Module):
    """One layer's bias table: bucket -> per-head logit offset (key ``pos_embedding.embedding``)."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, Lq, Lk]


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q, k, v = (p(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        # explicit product, not SDPA: the release rounds logits+bias to the model dtype and takes the
        # softmax in fp32; it runs once per prompt, so matching its rounding is worth more than speed
        logits = q @ k.transpose(-1, -2) + bias  # [B, H, L, L], no 1/sqrt(D) (T5)
        attn = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.o(out)


class FeedForward(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        # a one-element list so the key reads ``ffn.gate.0.weight`` as in the checkpoint
        self.gate = nn.ModuleList([nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)])
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * F.gelu(self.gate[0](x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        # padded keys get exactly finfo.min (the release masked_fills, it does not add)
        bias = torch.where(key_ok, self.pos_embedding(buckets), torch.finfo(x.dtype).min).to(x.dtype)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class TextEncoder(nn.Module):
    """umT5 encoder with Wan's parameter names. ``forward(ids, mask)`` -> ctx [B, L, dim] in the weight
    dtype, rows where ``mask == 0`` set to exactly zero (as the release's wrapper does)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # ids, mask: [B, L] integer; mask 1 on the prompt's tokens (EOS included), 0 on padding
        x = self.token_embedding(ids)  # [B, L, C]
        buckets = relative_position_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_dist, ids.device)
        key_ok = (mask != 0)[:, None, None, :]  # [B, 1, 1, Lk]
        for block in self.blocks:
            x = block(x, buckets, key_ok)
        x = self.norm(x)
        return torch.where((mask != 0)[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def random_text_values(cfg: UMT5Config, generator: torch.Generator | None = None):
    """Yield ``(name, float32 value)`` for every parameter in a fixed draw order: normal draws at the
    release's init scales, RMSNorm weights at 1 (reads only ``cfg``: a full-size encoder streams to disk)."""

    def normal(name: str, shape: tuple[int, ...], std: float):
        return name, torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std)

    d, da, f, h = cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads
    yield normal("token_embedding.weight", (cfg.vocab, d), 1.0)
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        yield normal(b + "attn.q.weight", (da, d), (d * da) ** -0.5)
        yield normal(b + "attn.k.weight", (da, d), d**-0.5)
        yield normal(b + "attn.v.weight", (da, d), d**-0.5)
        yield normal(b + "attn.o.weight", (d, da), (h * da) ** -0.5)
        yield normal(b + "ffn.gate.0.weight", (f, d), d**-0.5)
        yield normal(b + "ffn.fc1.weight", (f, d), d**-0.5)
        yield normal(b + "ffn.fc2.weight", (d, f), f**-0.5)
        yield normal(b + "pos_embedding.embedding.weight", (cfg.num_buckets, h), (2 * cfg.num_buckets * h) ** -0.5)
        yield b + "norm1.weight", torch.ones(d)
        yield b + "norm2.weight", torch.ones(d)
    yield "norm.weight", torch.ones(d)


def build_text_encoder(cfg: UMT5Config, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, *, generator: torch.Generator | None = None
                       ) -> TextEncoder:
    """A randomly initialised encoder in eval mode, deterministic given the CPU ``generator`` (each tensor
    is drawn on the CPU, then cast and moved, so the weights exist once, in ``dtype``, on ``device``)."""
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    enc = enc.to(dtype).to_empty(device=device)
    params = dict(enc.named_parameters())
    with torch.no_grad():
        for name, value in random_text_values(cfg, generator):
            params.pop(name).copy_(value)
    assert not params, f"random_text_values left {sorted(params)} uninitialised"
    return enc.eval().requires_grad_(False)


def load_text_encoder(path: str | os.PathLike, cfg: UMT5Config | None = None,
                      dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> TextEncoder:
    """Load ``models_t5_umt5-xxl-enc-bf16.pth`` (a flat dict of Wan names) into a meta-built encoder, mmapped
    and assigned (the 11.4 GB are never held twice); strict keys: a wrong file raises ``CheckpointError``."""
    cfg = cfg or UMT5Config()
    sd = strip_and_select(read_checkpoint(path))
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    what = f"umT5 text encoder ({cfg.num_layers} layers, dim {cfg.dim})"
    assign_state_dict(enc, sd, path, dtype=dtype, device=device, what=what)
    return enc.eval().requires_grad_(False)


def encode_prompt(encoder: TextEncoder, tokenizer, prompts: str | Sequence[str],
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, TokenizedPrompts]:
    """Tokenize and encode: ctx [B, text_len, dim] (zero from each prompt's length on) + tokenizer info.
    ``dtype`` defaults to the encoder's (bf16 in the release, the same tensor feeding both DiT streams);
    ``info.truncation_messages()`` says what a too-long prompt lost; an empty prompt raises ``PromptError``."""
    info = tokenizer(prompts)
    if info.ids.shape[1] != encoder.cfg.text_len:
        raise ValueError(f"tokenizer pads to {info.ids.shape[1]} tokens, the encoder expects {encoder.cfg.text_len}")
    if int(info.ids.max()) >= encoder.cfg.vocab:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name', '?')} produced id {int(info.ids.max())}, beyond the "
            f"encoder's vocabulary of {encoder.cfg.vocab}: tokenizer and encoder do not belong together"
        )
    w = encoder.token_embedding.weight
    device = w.device if device is None else torch.device(device)
    with torch.no_grad():
        ctx = encoder(info.ids.to(device), info.mask.to(device))
    return ctx.to(dtype or w.dtype), info


def release_text_encoder(encoder: TextEncoder) -> None:
    """Free the encoder's weights once the prompt is encoded (11.4 GB on the DiT GPU at full size); the
    module stays valid but weightless (``load_text_encoder`` again to re-encode)."""
    on_cuda = any(p.is_cuda for p in encoder.parameters())
    encoder.to("meta")
    if on_cuda:
        torch.cuda.empty_cache()
