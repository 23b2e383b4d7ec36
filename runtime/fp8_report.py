"""How far ``--precision fp8`` moves the stream (the table of ``bench/fp8_deviation.py``): the same seeded
stream through the DiT in fp32, bf16 and bf16 with float8 Linears (``scaled_mm``, ``emulate``), compared
per forward, on the committed latents and on the decoded frames; see ``docs/ARCHITECTURE.md``, "fp8
deviation"."""

from __future__ import annotations

import math
import time

import torch

from hallolive_rt.config import load_fusion_config
from hallolive_rt.model.dit_weights import build_dit
from hallolive_rt.profile import load_profile
from hallolive_rt.sampler import TorchNoise
from hallolive_rt.stream import generate

__all__ = ["fp8_deviation"]


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.pow(2).mean().sqrt().item()
    return (a - b).pow(2).mean().sqrt().item() / den if den else float("nan")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _inputs(profile, blocks: int, seed: int, device):
    g = torch.Generator(device=device).manual_seed(seed)
    s, v = profile.stream, profile.video
    nv = torch.randn(s.batch, blocks * s.latent_frames_per_block, v.latent_channels, v.latent_height,
                     v.latent_width, generator=g, device=device)
    na = torch.randn(s.batch, blocks * s.audio_tokens_per_block, profile.audio.latent_channels, generator=g,
                     device=device)
    ctx = 0.5 * torch.randn(s.batch, profile.text.text_len, profile.text.text_dim, generator=g, device=device)
    return nv, na, ctx


@torch.no_grad()
def _run(dit, profile, dtype, inputs, seed: int, device) -> dict:
    nv, na, ctx = (t.to(dtype) for t in inputs)
    t = time.perf_counter()
    res = generate(dit, profile.with_overrides(dtype=str(dtype).removeprefix("torch.")), ctx, nv, na,
                   TorchNoise(seed + 1, device=device), record=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    x0 = [((r.block, r.step), r.x0_v.float(), r.x0_a.float()) for r in res.records if r.x0_v is not None]
    return {"x0": x0, "video": res.video.float(), "audio": res.audio.float(), "seconds": time.perf_counter() - t}


@torch.no_grad()
def _decode(vdec, profile, video: torch.Tensor) -> torch.Tensor:
    """Committed latents [B, N*Fb, C, h, w] -> uint8 frames, block by block as the runtime decodes."""
    from .decode_pipeline import frames_to_uint8

    st = vdec.new_state(video.shape[0], profile.video.latent_height, profile.video.latent_width)
    z = video.transpose(1, 2).float()  # [B, C, T, h, w]
    fb = profile.stream.latent_frames_per_block
    out = [vdec.decode_block(z[:, :, i:i + fb], st, i == 0) for i in range(0, z.shape[2], fb)]
    return frames_to_uint8(torch.cat(out, dim=2)[0])


def _compare(run: dict, ref: dict, frames=None, ref_frames=None) -> dict:
    per = [{"block": k[0], "step": k[1], "video": _rel_rms(v, rv), "audio": _rel_rms(a, ra)}
           for (k, v, a), (rk, rv, ra) in zip(run["x0"], ref["x0"]) if k == rk]
    if len(per) != len(ref["x0"]):
        raise AssertionError("the runs' forwards do not line up")
    out = {"x0_rel_rms": {s: {"max": max(p[s] for p in per), "mean": sum(p[s] for p in per) / len(per)}
                          for s in ("video", "audio")},
           "x0_rel_rms_per_forward": per,
           "latents_rel_rms": {"video": _rel_rms(run["video"], ref["video"]),
                               "audio": _rel_rms(run["audio"], ref["audio"])}}
    if frames is not None:
        out["frames_psnr_db"] = _psnr(frames, ref_frames)
    return out


def fp8_deviation(preset: str = "tiny", *, device: str = "cpu", blocks: int | None = None, seed: int = 0,
                  with_fp32: bool = True, impls: tuple[str, ...] = ("scaled_mm", "emulate"),
                  act_scale: str = "token", decode: bool = True, log=print) -> dict:
    """Run the stream in each precision and compare (module docstring). Returns the JSON-ready table."""
    from hallolive_rt.model.fp8 import scaled_mm_works
    from hallolive_rt.release import decoder_configs

    from .metrics import env_info

    dev = torch.device(device)
    prof = load_profile(preset).with_overrides(blocks=blocks)
    n = prof.stream.blocks
    cfg = load_fusion_config(prof.video_config, prof.audio_config)
    inputs = _inputs(prof, n, seed, dev)
    runs: dict[str, dict] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "fp32" and not with_fp32:
            continue
        dit = build_dit(cfg, device=dev, dtype=dtype, seed=seed)
        runs[name] = _run(dit, prof, dtype, inputs, seed, dev)
        log(f"{name}: {runs[name]['seconds']:.1f} s")
        if name == "fp32":
            del dit
    fp8_info, skipped = None, {}
    for impl in impls:  # quantize the bf16 DiT once, then switch the implementation of its float8 Linears
        why = scaled_mm_works(dev, torch.bfloat16) if impl == "scaled_mm" else None
        if why is not None:
            skipped[f"fp8/{impl}"] = why
            continue
        if fp8_info is None:
            fp8_info = dit.quantize_fp8(act_scale=act_scale, impl=impl)
        for m in dit.modules():
            if hasattr(m, "impl") and hasattr(m, "weight_scale"):
                m.impl = impl
        runs[f"fp8/{impl}"] = _run(dit, prof, torch.bfloat16, inputs, seed, dev)
        log(f"fp8/{impl}: {runs[f'fp8/{impl}']['seconds']:.1f} s")
    del dit
    frames = {}
    if decode:
        vcfg = decoder_configs(prof)[0]
        from hallolive_rt.model.vae_video import build_video_decoder

        torch.manual_seed(seed + 1)
        vdec = build_video_decoder(vcfg, device=dev).float()  # .float() rebuilds the statistics in float32 on dev
        frames = {k: _decode(vdec, prof, r["video"]) for k, r in runs.items()}
    pairs = [("bf16", "fp32")] + [(f"fp8/{i}", vs) for i in impls for vs in ("fp32", "bf16")]
    pairs.append(("fp8/scaled_mm", "fp8/emulate"))  # the float8 kernel against its reference
    rows = [{"run": a, "vs": b, **_compare(runs[a], runs[b], frames.get(a), frames.get(b))}
            for a, b in pairs if a in runs and b in runs]
    hw = "cpu" if dev.type == "cpu" else "gpu"
    labels = {"fp32": "float32 everywhere", "bf16": "bfloat16 compute (the released precision)",
              "fp8/scaled_mm": ("torch._scaled_mm row-wise float8 GEMMs, bf16 elsewhere" +
                                (" (CPU reference kernel: float8 values, float32 arithmetic; EMULATED, no float8 "
                                 "hardware)" if hw == "cpu" else " (float8 tensor cores)")),
              "fp8/emulate": "float8 quantize-dequantize with the same scales, float32 GEMMs, bf16 elsewhere "
                             "(EMULATED: the reference of the scaled_mm path)"}
    return {"what": "fp8 deviation table (hallolive_rt.runtime.fp8_report)", "preset": prof.name, "blocks": n,
            "seed": seed, "device": str(dev), "emulated": hw == "cpu", "weights": f"random:{seed}",
            "act_scale": act_scale, "fp8": fp8_info, "skipped": skipped,
            "runs": {k: {"label": labels[k], "seconds": r["seconds"]} for k, r in runs.items()},
            "decoder": "video VAE of the profile, random weights, float32" if decode else None,
            "rows": rows, "env": env_info([dev])}
