"""Where the DiT and the decoders run: device names checked and made canonical, and the CUDA stream
priorities of the DiT and of the decode."""

from __future__ import annotations

import torch

__all__ = ["canonical_device", "resolve_devices", "DIT_STREAM_PRIORITY", "DECODE_STREAM_PRIORITY"]


# Stream priorities (CUDA; lower number = higher priority). On one GPU the DiT of block i+1 and the
# decode of block i share the SMs. The DiT is the critical path: every later block, and so every later
# frame, waits for it, while a late decode delays only frames already computed, and the DiT's kernels
# leave bubbles (launch gaps, wave tails, the small GEMMs of the audio stream) that the decode fills.
# So the DiT's stream is high priority and the decode's low: the block scheduler dispatches pending DiT
# blocks first, the decode takes what is left, and the DiT is never starved. The copy stream (the
# hand-off of latents, a few MB) serves the decode and gets its priority. Out-of-range values are
# clamped by CUDA to the device's range (typically [-5, 0]); on two GPUs the priorities are moot.
DIT_STREAM_PRIORITY = -1
DECODE_STREAM_PRIORITY = 0


def canonical_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: "cuda" means the current CUDA device (``cuda:N``), as everywhere in torch;
    what a thread's ``torch.cuda.set_device`` and the clocks' per-device keys need."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_devices(dit_device: str | torch.device, vae_device: str | torch.device | None = None):
    """Validate the two device names; returns (dit, vae) torch.devices (vae defaults to the DiT's)."""
    devs = []
    pairs = (("--dit-device", dit_device), ("--vae-device", vae_device if vae_device is not None else dit_device))
    for flag, d in pairs:
        try:
            dev = torch.device(d)
        except RuntimeError as e:
            raise ValueError(f"{flag} {d!r} is not a device name (cpu, cuda, cuda:N)") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"{flag} {d}: no CUDA device here (torch {torch.__version__}, "
                                 f"CUDA build: {torch.version.cuda}); use cpu")
            dev = canonical_device(dev)
            if dev.index >= torch.cuda.device_count():
                raise ValueError(f"{flag} {d}: only {torch.cuda.device_count()} CUDA device(s) visible")
        elif dev.type != "cpu":
            raise ValueError(f"{flag} {d}: only cpu and cuda devices are supported")
        devs.append(dev)
    if devs[0].type != devs[1].type:
        raise ValueError(f"--dit-device {devs[0]} and --vae-device {devs[1]}: both must be CUDA or both CPU")
    return devs[0], devs[1]
