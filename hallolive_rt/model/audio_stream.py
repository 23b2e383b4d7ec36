"""Audio decode: the release's one-shot ``decode_full`` and ``StreamingAudioDecoder``, which per block
re-decodes a window ``[left context | block (N tokens) | future (F)]`` of latent tokens [B, 30, L] and keeps
exactly the block's N * 512 samples (16 kHz), with an explicit ``AudioStreamState`` and one window length
per static variant (``start`` = trim | reflect | zeros); ``measure_stream_deviation`` compares it with the
whole-clip decode. Why a window, and its shapes: ``docs/ARCHITECTURE.md``, "Streaming audio decode".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hallolive_rt.model.vae_audio import AudioVAEDecoder
from hallolive_rt.model.vocoder import BigVGANVocoder

__all__ = ["decode_full", "AudioStreamState", "StreamingAudioDecoder", "measure_stream_deviation"]

_STARTS = ("trim", "reflect", "zeros")


def _decode(vae: AudioVAEDecoder, vocoder: BigVGANVocoder, latents: torch.Tensor) -> torch.Tensor:
    """[B, L, C] channel-last latents -> [B, L * spt] waveform, in the models' dtype."""
    mel = vae(latents.transpose(1, 2))  # [B, 80, 2L]
    return vocoder(mel)[:, 0]  # [B, 512 L]


@torch.inference_mode()
def decode_full(vae: AudioVAEDecoder, vocoder: BigVGANVocoder, latents: torch.Tensor) -> torch.Tensor:
    """The release's behaviour: one decode of all latents [B, L, 20] -> float32 wav [B, L * 512]."""
    p = next(vae.parameters())
    return _decode(vae, vocoder, latents.to(p.device, p.dtype)).float()


@dataclass
class AudioStreamState:
    """What a stream carries between blocks; preallocated once per stream by ``new_state``."""

    history: torch.Tensor  # [B, left, C]: the last ``left`` committed tokens, oldest first
    committed: int = 0  # tokens committed so far (a host counter: never read back from a tensor)


class StreamingAudioDecoder:
    """Decodes committed audio latents block by block; holds references to the two models only."""

    def __init__(self, vae: AudioVAEDecoder, vocoder: BigVGANVocoder, *, block_tokens: int,
                 left_context: int, future_tokens: int = 0, samples_per_token: int = 512,
                 start: str = "trim"):
        if start not in _STARTS:
            raise ValueError(f"start={start!r}; choose one of {', '.join(_STARTS)}")
        spt = vae.cfg.mel_frames_per_token * vocoder.cfg.hop_length
        if spt != samples_per_token:
            raise ValueError(f"the decoders give {spt} samples per token, the profile says {samples_per_token}")
        if block_tokens < 1 or left_context < 0 or future_tokens < 0:
            raise ValueError("block_tokens must be >= 1, left_context and future_tokens >= 0")
        self.vae, self.vocoder = vae, vocoder
        self.block_tokens, self.left, self.future = block_tokens, left_context, future_tokens
        self.spt, self.start = samples_per_token, start

    @classmethod
    def from_profile(cls, profile, vae: AudioVAEDecoder, vocoder: BigVGANVocoder, *,
                     start: str = "trim") -> "StreamingAudioDecoder":
        return cls(vae, vocoder, block_tokens=profile.stream.audio_tokens_per_block,
                   left_context=profile.audio.stream_left_context,
                   future_tokens=profile.stream.future_audio_tokens,
                   samples_per_token=profile.audio.samples_per_token, start=start)

    def new_state(self, batch: int) -> AudioStreamState:
        p = next(self.vae.parameters())
        channels = self.vae.cfg.embed_dim
        return AudioStreamState(torch.zeros(batch, self.left, channels, device=p.device, dtype=p.dtype))

    def decode_window(self, window: torch.Tensor) -> torch.Tensor:
        """[B, W, C] -> [B, W * spt] in the models' dtype. Fixed-shape and sync-free: compile this."""
        return _decode(self.vae, self.vocoder, window)

    @torch.inference_mode()
    def step(self, state: AudioStreamState, block: torch.Tensor,
             future: torch.Tensor | None = None) -> torch.Tensor:
        """Commit ``block`` [B, N, C] and return its float32 samples [B, N * spt]; ``future`` [B, F, C]: the
        lookahead the caller will NOT commit (None at the stream end or when F = 0)."""
        n = self.block_tokens
        if block.shape[1] != n:
            raise ValueError(f"block has {block.shape[1]} tokens, the stream commits {n} per block")
        if future is not None and future.shape[1] != self.future:
            raise ValueError(f"future has {future.shape[1]} tokens, the stream was set up for {self.future}")
        p = next(self.vae.parameters())
        block = block.to(p.device, p.dtype)
        have = min(state.committed, self.left)
        real = [state.history[:, self.left - have:], block]
        if future is not None and self.future:
            real.append(future.to(p.device, p.dtype))
        window = torch.cat(real, dim=1)  # [B, have + N (+ F), C]
        offset = have
        if self.start != "trim":
            missing_right = self.future if future is None else 0
            window = self._pad(window, self.left - have, missing_right)
            offset = self.left
        wav = self.decode_window(window)[:, offset * self.spt:(offset + n) * self.spt]
        if self.left:
            state.history.copy_(torch.cat([state.history, block], dim=1)[:, -self.left:])
        state.committed += n
        return wav.float()

    def _pad(self, window: torch.Tensor, left: int, right: int) -> torch.Tensor:
        """Extend ``window`` by ``left``/``right`` tokens: zero latents or a mirror image (periodic, so any
        pad length works). Indices are host integers: the padded shape never depends on tensor values."""
        if not (left or right):
            return window
        n = window.shape[1]
        if self.start == "zeros":
            b, _, c = window.shape
            return torch.cat([window.new_zeros(b, left, c), window, window.new_zeros(b, right, c)], dim=1)

        def mirror(d: int) -> int:  # d-th token beyond an edge (0 = the adjacent one), counted inward
            m = d % (2 * n)
            return m if m < n else 2 * n - 1 - m

        idx = [mirror(left - 1 - j) for j in range(left)] + list(range(n))
        idx += [n - 1 - mirror(d) for d in range(right)]
        return window[:, torch.tensor(idx, device=window.device)]


@torch.inference_mode()
def measure_stream_deviation(vae: AudioVAEDecoder, vocoder: BigVGANVocoder, latents: torch.Tensor, *,
                             block_tokens: int, left_context: int, future_tokens: int = 0,
                             start: str = "trim") -> dict[str, float]:
    """Stream ``latents`` [B, K*N, C] with the ideal lookahead (the true next tokens) and compare with
    ``decode_full``: max abs error, SNR in dB (whole clip, worst block) and the full decode's RMS."""
    total = latents.shape[1]
    if total % block_tokens:
        raise ValueError(f"{total} tokens are not a whole number of {block_tokens}-token blocks")
    spt = vae.cfg.mel_frames_per_token * vocoder.cfg.hop_length
    dec = StreamingAudioDecoder(vae, vocoder, block_tokens=block_tokens, left_context=left_context,
                                future_tokens=future_tokens, samples_per_token=spt, start=start)
    ref = decode_full(vae, vocoder, latents)  # [B, T]
    state = dec.new_state(latents.shape[0])
    outs = []
    for s in range(0, total, block_tokens):
        e = s + block_tokens
        fut = latents[:, e:e + future_tokens] if future_tokens and e + future_tokens <= total else None
        outs.append(dec.step(state, latents[:, s:e], fut))
    got = torch.cat(outs, dim=1)
    if got.shape != ref.shape:
        raise AssertionError(f"streamed {tuple(got.shape)} samples, full decode {tuple(ref.shape)}")

    def snr(r: torch.Tensor, g: torch.Tensor) -> float:
        noise = (g - r).double().pow(2).sum().item()
        return math.inf if noise == 0 else 10 * math.log10(r.double().pow(2).sum().item() / noise)

    span = block_tokens * spt
    return {
        "max_abs": (got - ref).abs().max().item(),
        "snr_db": snr(ref, got),
        "worst_block_snr_db": min(snr(ref[:, i:i + span], got[:, i:i + span]) for i in range(0, ref.shape[1], span)),
        "rms_full": ref.pow(2).mean().sqrt().item(),
    }
