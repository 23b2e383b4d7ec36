"""One DiT forward of a stream, for diagnosis: ``forward_at(dit, profile, ctx, noise_v, noise_a, seed=0,
block=b, step=s)`` runs the real loop (``BlockStream``) through block ``b`` and returns the
``ForwardRecord`` of step ``s`` (``s == steps``: the t = 0 context pass): its inputs (``vid_in``, ``aud_in``,
``vid_t``, ``aud_t``) and what it predicted (``flow_v``, ``flow_a``, ``x0_v``, ``x0_a``), to compare one
forward with another implementation on identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .model.dit import DualStreamDiT
from .profile import Profile
from .sampler import NoiseSource, TorchNoise
from .stream import BlockStream, ForwardRecord, whole_blocks

__all__ = ["forward_at"]


def forward_at(dit: DualStreamDiT, profile: Profile, ctx: torch.Tensor, noise_v: torch.Tensor,
               noise_a: torch.Tensor, noise: NoiseSource | None = None, *, seed: int | None = None,
               block: int, step: int, policy=None, step_fn: Callable | None = None) -> ForwardRecord:
    """The record of the DiT forward at ``block``, ``step`` of the stream ``generate`` would run.

    Same arguments as ``generate`` (prompt context ``ctx``, initial noise of every block ``noise_v`` /
    ``noise_a``, re-noise source ``noise``, or ``seed`` for a ``TorchNoise(seed)`` on ``noise_v``'s device;
    ``policy`` and ``step_fn`` as there). Blocks after ``block`` are not run; those up to it run in full,
    since a block's caches are only final after its context pass. The whole noise is needed even so: with
    audio lookahead, block ``b``'s window reads the next blocks' noise.
    """
    if (noise is None) == (seed is None):
        raise ValueError("give exactly one of noise= (a NoiseSource) or seed= (an int)")
    n = whole_blocks(profile, noise_v, noise_a)
    steps = len(profile.stream.denoising_steps)
    if not 0 <= block < n:
        raise ValueError(f"block {block} is outside the stream: the noise holds blocks 0..{n - 1}")
    if not 0 <= step <= steps:
        raise ValueError(f"step {step} is outside 0..{steps} ({steps} denoising forwards 0..{steps - 1}, "
                         f"then the t=0 context pass as step {steps})")
    noise = noise if noise is not None else TorchNoise(seed, device=noise_v.device)
    fb, na = profile.stream.latent_frames_per_block, profile.stream.audio_tokens_per_block
    bs = BlockStream(dit, profile, blocks=n, policy=policy, device=noise_v.device)
    if step_fn is not None:
        bs.step_fn = step_fn
    for out in bs.run(ctx, lambda i: noise_v[:, i * fb:(i + 1) * fb], lambda i: noise_a[:, i * na:(i + 1) * na],
                      noise, record=True):
        if out.index == block:
            return out.records[step]
    raise AssertionError(f"the loop ended before block {block}")  # unreachable: block < n was checked
