"""Fused projections (opt-in: ``DualStreamDiT.fuse_projections()``): the ``nn.Linear`` layers of a module
that read the same input run as one GEMM over one non-persistent buffer that the members' parameters are
row slices of, so ``state_dict()`` is unchanged. The rules: ``docs/ARCHITECTURE.md``, "Fused projections".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusableProjections"]


class FusableProjections(nn.Module):
    """Mixin for modules whose ``nn.Linear`` members in ``FUSED_GROUPS`` (group -> member names, all
    with bias, all reading one input) may run as one GEMM per group; see the module docstring."""

    FUSED_GROUPS: dict[str, tuple[str, ...]] = {}
    projections_fused: bool = False

    def project(self, group: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of ``group``'s members on ``x``, in member order (one GEMM when fused)."""
        names = self.FUSED_GROUPS[group]
        if not self.projections_fused:
            return tuple(getattr(self, n)(x) for n in names)
        fp8 = self._modules.get(f"{group}_fp8")  # the group quantized by model/fp8.py: one float8 GEMM
        y = fp8(x) if fp8 is not None else F.linear(x, getattr(self, f"{group}_weight"), getattr(self, f"{group}_bias"))
        return y.split([getattr(self, n).out_features for n in names], dim=-1)

    @property
    def fp8_frozen(self) -> bool:
        """True once ``model/fp8.py`` quantized a fused group: the layout can no longer change."""
        return any(f"{g}_fp8" in self._modules for g in self.FUSED_GROUPS)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate each group's weights once and make the members' parameters views of them."""
        self.unfuse_projections()
        for group, names in self.FUSED_GROUPS.items():
            members = [getattr(self, n) for n in names]
            for attr in ("weight", "bias"):
                fused = torch.cat([getattr(m, attr) for m in members])
                self.register_buffer(f"{group}_{attr}", fused, persistent=False)
                row = 0
                for m in members:
                    old = getattr(m, attr)
                    setattr(m, attr, nn.Parameter(fused[row:row + old.shape[0]], requires_grad=old.requires_grad))
                    row += old.shape[0]
        self.projections_fused = True

    def unfuse_projections(self) -> None:
        """Back to one GEMM per member (no copy: the members keep their slices as parameters)."""
        if not self.projections_fused:
            return
        if self.fp8_frozen:
            raise RuntimeError("these projections were quantized to float8 while fused: their layout is frozen "
                               "(load the DiT again to unfuse them)")
        for group in self.FUSED_GROUPS:
            del self._buffers[f"{group}_weight"], self._buffers[f"{group}_bias"]
        self.projections_fused = False

    def _apply(self, fn, recurse=True):
        # .to() / to_empty() replace each parameter separately: the slices would stop aliasing the fused
        # buffer, so convert the members alone and concatenate again on the converted tensors
        if self.fp8_frozen:  # float8 groups own their storage: nothing aliases a parameter any more
            return super()._apply(fn, recurse)
        fused = self.projections_fused
        self.unfuse_projections()
        super()._apply(fn, recurse)
        if fused:
            self.fuse_projections()
        return self
