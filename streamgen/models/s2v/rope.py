"""The S2V RoPE: Wan's 3-axis rotation with per-token positions (cond tokens do not form one grid),
optionally with cos/sin rounded to fp16 as the reference's complex32 factor table does (spec §2.3)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rope import Rope3D


class S2VRope(Rope3D):
    """Rope3D whose factors may be fp16-rounded, plus phases for arbitrary (frame, row, col) tokens."""

    def __init__(self, head_dim: int, theta: float, max_frames: int, fp16_factors: bool) -> None:
        super().__init__(head_dim, theta, max_frames)
        self.fp16_factors = fp16_factors

    def _phases(self, positions: Tensor, axis: int) -> Tensor:
        z = super()._phases(positions, axis)
        if not self.fp16_factors:
            return z
        return torch.complex(z.real.half().double(), z.imag.half().double())

    def token_phases(self, frames: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Phases [L, 1, pairs] for L tokens at the given integer positions (negative frames allowed)."""
        parts = [self._phases(p, axis) for axis, p in enumerate((frames, rows, cols))]
        return torch.cat(parts, dim=-1)[:, None, :]
