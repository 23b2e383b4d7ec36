"""Every model a stream needs (``load_components``): from the official download layout, or random
weights of the profile's architecture built directly on the target devices (the full-size DiT never in
host RAM), always with the offline ``ByteTokenizer``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hallolive_rt.config import FusionConfig, load_fusion_config
from hallolive_rt.model.dit import DualStreamDiT
from hallolive_rt.model.dit_weights import build_dit, dit_entry, load_dit
from hallolive_rt.model.text import TextEncoder, UMT5Config, build_text_encoder, load_text_encoder
from hallolive_rt.model.text_tokenizer import load_tokenizer
from hallolive_rt.model.vae_audio import AudioVAEDecoder, build_audio_decoder, load_audio_decoder
from hallolive_rt.model.vae_video import WanVideoDecoder, build_video_decoder, load_video_decoder
from hallolive_rt.model.vocoder import BigVGANVocoder, build_vocoder, load_vocoder
from hallolive_rt.options import DecoderOptions
from hallolive_rt.profile import Profile
from hallolive_rt.release import MODEL_FILES, MissingModelFiles, ModelFiles, check_model_dir, decoder_configs

from .placement import canonical_device

__all__ = ["ModelFiles", "MODEL_FILES", "MissingModelFiles", "Components", "check_model_dir",
           "load_components", "decoder_configs", "weights_nbytes"]


@dataclass
class Components:
    profile: Profile
    cfg: FusionConfig
    dit: DualStreamDiT
    text_encoder: TextEncoder | None  # None once released (after encoding) or when not built
    tokenizer: object
    video_decoder: WanVideoDecoder  # or a tiny preview decoder of the same contract (model/vae_tiny.py)
    audio_vae: AudioVAEDecoder
    vocoder: BigVGANVocoder
    dtype: torch.dtype
    dit_device: torch.device
    vae_device: torch.device
    random_weights: bool
    source: str  # "random (seed N)" or the model directory


@torch.no_grad()
def _random_text_encoder(cfg: UMT5Config, device: torch.device, dtype: torch.dtype, seed: int) -> TextEncoder:
    """umT5 with random weights drawn on ``device`` (the released init scales; no host copy at full size)."""
    if device.type == "cpu" and cfg.dim <= 512:  # tiny: the text module's own builder (CPU generator)
        return build_text_encoder(cfg, device, dtype, generator=torch.Generator().manual_seed(seed))
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    enc = enc.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in enc.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
            continue
        std = 1.0 if "token_embedding" in name else (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.02)
        if "pos_embedding" in name:
            std = (2 * cfg.num_buckets * cfg.num_heads) ** -0.5
        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std))
    return enc.eval().requires_grad_(False)


def load_components(profile: Profile, model_dir: str | Path | None = None, *,
                    dit_device: str | torch.device = "cpu", vae_device: str | torch.device | None = None,
                    text_device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    seed: int = 0, with_text: bool = True, ema: bool = False,
                    decoders: DecoderOptions | None = None) -> Components:
    """Build (``model_dir=None``: random, seeded) or load every model of ``profile``: the DiT on
    ``dit_device``, the decoders on ``vae_device`` and the text encoder on ``text_device`` (both default to
    the DiT's; ``with_text=False`` skips the encoder). Missing files are reported all at once, before anything
    is loaded; ``ema`` picks ``generator_ema`` of a nested training file; ``decoders`` the video decoder."""
    dit_dev = canonical_device(dit_device)  # "cuda" -> "cuda:N": one name per device everywhere after this
    vae_dev = canonical_device(vae_device) if vae_device is not None else dit_dev
    text_dev = canonical_device(text_device) if text_device is not None else dit_dev
    dtype = dtype or profile.dtype
    cfg = load_fusion_config(profile.video_config, profile.audio_config)
    vcfg, acfg, gcfg, tcfg = decoder_configs(profile)
    tcfg = replace(tcfg, text_len=profile.text.text_len)
    if tcfg.dim != profile.text.text_dim or cfg.video.text_dim != profile.text.text_dim:
        raise ValueError(f"profile {profile.name}: text_dim {profile.text.text_dim} does not match the text "
                         f"encoder ({tcfg.dim}) / DiT ({cfg.video.text_dim})")
    enc = None
    if model_dir is None:
        dit = build_dit(cfg, device=dit_dev, dtype=dtype, seed=seed)
        with torch.device(vae_dev):
            torch.manual_seed(seed + 1)  # default inits of the decoders draw from the global generator
            # the cast rebuilds the latent statistics in the dtype the decoder's ``stats`` mode asks for
            # (the release's: the weights' dtype; vae_video.py's docstring)
            vdec = build_video_decoder(vcfg, device=vae_dev).to(dtype)
        adec = build_audio_decoder(acfg, vae_dev, dtype)
        voc = build_vocoder(gcfg, vae_dev, dtype)
        if with_text:
            enc = _random_text_encoder(tcfg, text_dev, dtype, seed + 2)
        tok = load_tokenizer(None, text_len=profile.text.text_len)
        source = f"random weights (seed {seed})"
    else:
        paths = check_model_dir(model_dir)
        dit = load_dit(paths["dit"], cfg, device=dit_dev, dtype=dtype, ema=ema)
        vdec = load_video_decoder(paths["video_vae"], vcfg, dtype=dtype, device=vae_dev)
        adec = load_audio_decoder(paths["audio_vae"], acfg, dtype=dtype, device=vae_dev)
        voc = load_vocoder(paths["vocoder"], gcfg, dtype=dtype, device=vae_dev)
        if with_text:
            enc = load_text_encoder(paths["text_encoder"], tcfg, dtype=dtype, device=text_dev)
        tok = load_tokenizer(paths["tokenizer"], text_len=profile.text.text_len)
        source = f"{model_dir} (DiT entry: {dit_entry(ema)} if nested)"
    if decoders is not None and decoders.tiny:
        vdec = _tiny_video_decoder(decoders, vae_dev, dtype, seed)
        source += f"; video decoder {decoders.video_decoder} ({decoders.tiny_weights or 'random weights'})"
    return Components(profile, cfg, dit, enc, tok, vdec, adec, voc, dtype, dit_dev, vae_dev,
                      model_dir is None, source)


def _tiny_video_decoder(decoders: DecoderOptions, device: torch.device, dtype: torch.dtype, seed: int):
    from hallolive_rt.model.vae_tiny import build_tiny_decoder, load_tiny_decoder

    if decoders.tiny_weights is not None:
        return load_tiny_decoder(decoders.tiny_weights, variant=decoders.video_decoder, dtype=dtype, device=device)
    with torch.device(device):
        torch.manual_seed(seed + 3)
        return build_tiny_decoder(variant=decoders.video_decoder, device=device).to(dtype)


def weights_nbytes(c: Components) -> dict[str, int]:
    """Bytes of weights per component (for the bench JSON)."""
    mods = {"dit": c.dit, "video_vae": c.video_decoder, "audio_vae": c.audio_vae, "vocoder": c.vocoder}
    if c.text_encoder is not None:
        mods["text_encoder"] = c.text_encoder
    return {k: _stored_bytes(m) for k, m in mods.items()}


def _stored_bytes(m: torch.nn.Module) -> int:
    """Bytes of a module's state (parameters and persistent buffers: float8 weights included), each
    storage once (fused projections and their members share one)."""
    storages = {}
    for t in m.state_dict(keep_vars=True).values():
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


