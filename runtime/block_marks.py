"""The DiT's marks of one block on the stream's clock (``runtime/clock.py``): its start, each forward (the
denoising steps, then the context pass), the hand-off of the committed latents to the decoders, and its
end; and the DiT stage times computed from them once the block is sealed."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockMarks"]


@dataclass
class BlockMarks:
    dit_start: object = None
    steps: list[tuple[object, object]] = field(default_factory=list)  # (before, after) per denoising forward
    context: tuple[object, object] | None = None  # the t = 0 context pass
    denoised: object = None  # after the last denoising step: the hand-off (None: not split)
    refresh_start: object = None  # the context pass begins
    dit_end: object = None

    def add_forward(self, before, after, *, context: bool) -> None:
        if context:
            self.context = (before, after)
        else:
            self.steps.append((before, after))

    def dit_ms(self, clock) -> float:
        """The DiT's time on the block: ``dit_start`` -> ``dit_end``, less the hand-off between its denoising
        steps and its context pass where it was split (the sequential pipeline decodes the block there)."""
        if self.denoised is not None:
            return clock.ms(self.dit_start, self.denoised) + clock.ms(self.refresh_start, self.dit_end)
        return clock.ms(self.dit_start, self.dit_end)

    def times(self, clock) -> dict[str, float]:
        """dit, dit_steps, dit_context in ms (waits for ``dit_end``: every earlier mark is on its stream)."""
        clock.wait(self.dit_end)
        return {"dit": self.dit_ms(clock), "dit_steps": sum(clock.ms(a, b) for a, b in self.steps),
                "dit_context": clock.ms(*self.context) if self.context is not None else 0.0}
