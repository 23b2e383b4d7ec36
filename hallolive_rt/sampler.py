"""The release's flow-matching schedule, its 4 warped steps, x0 / re-noise math and the noise source.
Schedule (docs/FACTS.md section 4): shift 5, 1000 training steps, s_i = linspace(1, 0, 1001)[i] (i < 1000),
sigma = shift*s / (1 + (shift-1)*s), t = 1000*sigma, all float32 as in the release. The step list
[1000, 750, 500, 250] is warped through the table to t = 1000, 937.5, 833.33, 625. sigma(t) is the
table entry whose t is nearest (so sigma(0) is the last entry, ~0.00498). Every constant is computed
here once, on the host, before a stream starts; nothing is looked up per step on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .profile import Profile

__all__ = ["Schedule", "NoiseSource", "TorchNoise", "RecordingNoise", "ReplayNoise", "x0_from_flow", "renoise"]


@dataclass(frozen=True)
class Schedule:
    """Warped timesteps (model input, float32 values) and the sigmas the sampler uses with them."""

    timesteps: tuple[float, ...]  # t of each denoising step, e.g. (1000.0, 937.5, 833.333, 625.0)
    sigmas: tuple[float, ...]  # sigma(t) of each step (float32 values held as Python floats)
    context_sigma: float  # sigma(0): used to turn the t=0 predictions of the history into x0

    @classmethod
    def from_profile(cls, profile: Profile) -> "Schedule":
        s = profile.stream
        n = s.num_train_timesteps
        base = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float32)[:-1]
        sig = s.shift * base / (1 + (s.shift - 1) * base)  # float32, [n]
        ts = sig * n
        table = torch.cat([ts, torch.zeros(1)])
        idx = [n - int(k) for k in s.denoising_steps]
        if any(i < 0 or i > n for i in idx):
            raise ValueError(f"denoising_steps {s.denoising_steps} must lie in [0, {n}]")
        warped = [table[i] for i in idx]

        def sigma_of(t: torch.Tensor) -> float:
            return float(sig[torch.argmin((ts.double() - t.double()).abs())])

        return cls(tuple(float(t) for t in warped), tuple(sigma_of(t) for t in warped),
                   sigma_of(torch.tensor(0.0)))

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * v in float64 (as released), cast back to x_t's dtype.

    ``sigma`` is a float or a tensor broadcastable to x_t (e.g. [1, La, 1] for per-token sigmas).
    """
    s = sigma.double() if isinstance(sigma, torch.Tensor) else sigma
    return (x_t.double() - s * flow.double()).to(x_t.dtype)


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Next step's input (1 - sigma) x0 + sigma eps, in float32 like the release's add_noise.

    ``sigma`` is a float32 table value held as a Python float, so 1 - sigma is exact in float32 and the
    scalars travel as kernel arguments (no host-to-device copy, no stall of the host).
    """
    return ((1.0 - sigma) * x0.float() + sigma * eps.float()).to(eps.dtype)


class NoiseSource:
    """Where fresh noise comes from. Draw order is part of the contract: video first, then audio."""

    def video(self, like: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def audio(self, like: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TorchNoise(NoiseSource):
    """Standard normal draws from a seeded ``torch.Generator`` on the tensors' device."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen, device=like.device, dtype=torch.float32).to(like.dtype)

    def video(self, like):
        return self._draw(like)

    def audio(self, like):
        return self._draw(like)


class RecordingNoise(NoiseSource):
    """Wraps a source and keeps every draw, in order, so a run can be replayed draw for draw."""

    def __init__(self, inner: NoiseSource):
        self.inner = inner
        self.draws: list[tuple[str, torch.Tensor]] = []

    def video(self, like):
        x = self.inner.video(like)
        self.draws.append(("video", x.detach().clone()))
        return x

    def audio(self, like):
        x = self.inner.audio(like)
        self.draws.append(("audio", x.detach().clone()))
        return x


class ReplayNoise(NoiseSource):
    """Replays recorded draws; a different order or shape than recorded is an error, not a silent skew."""

    def __init__(self, draws: list[tuple[str, torch.Tensor]]):
        self.draws = list(draws)
        self.i = 0

    def _next(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        if self.i >= len(self.draws):
            raise RuntimeError(f"replay exhausted after {self.i} draws (asked for {kind} {tuple(like.shape)})")
        k, x = self.draws[self.i]
        if k != kind or x.shape != like.shape:
            raise RuntimeError(f"replay draw {self.i}: recorded {k} {tuple(x.shape)}, asked {kind} {tuple(like.shape)}")
        self.i += 1
        return x.to(device=like.device, dtype=like.dtype)

    def video(self, like):
        return self._next("video", like)

    def audio(self, like):
        return self._next("audio", like)
