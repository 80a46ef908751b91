"""3D rotary position embedding of Wan2.1 (spec §a.3): adjacent-pair complex rotation, float64 math.

Positions are (frame, row, col). Frames are given per call, so cache policies decide where keys and
queries sit in time (absolute, slot-relative, re-aligned sinks) while this module only rotates.
"""
from __future__ import annotations

import torch
from torch import Tensor


def axis_frequencies(axis_dim: int, theta: float) -> Tensor:
    """θ_k = theta^(-2k/axis_dim) for one axis (axis_dim real channels), float64."""
    return 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


def rotate(x: Tensor, phases: Tensor) -> Tensor:
    """x [B, L, heads, head_dim] times complex phases [L, 1, head_dim/2], in float64, back to x's dtype."""
    b, length, heads, dim = x.shape
    z = torch.view_as_complex(x.to(torch.float64).reshape(b, length, heads, dim // 2, 2))
    return torch.view_as_real(z * phases.to(x.device)).flatten(3).to(x.dtype)


class Rope3D:
    """Rotates [B, L, heads, head_dim] tensors whose L tokens form a (frames, h, w) grid."""

    def __init__(self, head_dim: int, theta: float = 10000.0, max_frames: int = 1024) -> None:
        pairs = head_dim // 2
        spatial = pairs // 3
        self.split = (pairs - 2 * spatial, spatial, spatial)  # complex pairs: time, height, width
        self.freqs = tuple(axis_frequencies(2 * n, theta) for n in self.split)
        self.max_frames = max_frames
        self._spatial: dict[tuple[int, int], Tensor] = {}

    def _phases(self, positions: Tensor, axis: int) -> Tensor:
        """exp(i·p·θ) for integer positions p (any sign, any size), complex128 [len(p), pairs]."""
        angles = torch.outer(positions.to(torch.float64), self.freqs[axis])
        return torch.polar(torch.ones_like(angles), angles)

    def _spatial_phases(self, height: int, width: int) -> Tensor:
        key = (height, width)
        if key not in self._spatial:
            ph = self._phases(torch.arange(height), 1)[:, None, :].expand(height, width, -1)
            pw = self._phases(torch.arange(width), 2)[None, :, :].expand(height, width, -1)
            self._spatial[key] = torch.cat([ph, pw], dim=-1).reshape(height * width, -1)
        return self._spatial[key]

    def phases(self, frames: Tensor, height: int, width: int) -> Tensor:
        """Complex phases [len(frames)·h·w, 1, pairs] for tokens in (frame, h, w) row-major order."""
        pt = self._phases(frames, 0)  # [F, time pairs]
        hw = self._spatial_phases(height, width)  # [h·w, spatial pairs]
        f, s = pt.shape[0], hw.shape[0]
        full = torch.cat([pt[:, None, :].expand(f, s, -1), hw[None].expand(f, s, -1)], dim=-1)
        return full.reshape(f * s, 1, -1)

    def apply(self, x: Tensor, frames: Tensor | range, height: int, width: int) -> Tensor:
        """Rotate x [B, L, heads, head_dim]; token frames given by `frames` (one entry per frame)."""
        frames = torch.as_tensor(list(frames) if isinstance(frames, range) else frames)
        return rotate(x, self.phases(frames, height, width))

    def shift_time_(self, x: Tensor, delta: int) -> None:
        """Move already-roped keys [B, L, heads, head_dim] by `delta` frames in place.

        RoPE is a rotation, so R(p + Δ) = R(Δ)·R(p): only the temporal channels change (Deep Forcing).
        """
        if delta == 0:
            return
        t_real = 2 * self.split[0]
        b, length, heads, _ = x.shape
        part = x[..., :t_real]
        z = torch.view_as_complex(part.to(torch.float64).reshape(b, length, heads, t_real // 2, 2).contiguous())
        rot = self._phases(torch.tensor([delta]), 0)[0].to(x.device)
        part.copy_(torch.view_as_real(z * rot).flatten(3).to(x.dtype))
