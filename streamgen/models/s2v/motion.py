"""FramePack motion tokens (`frame_packer`, spec §2.5): the last sum(zip_frame_buckets) motion latents,
newest bucket at full resolution, older buckets packed 2x and 4x, with fixed negative RoPE frames."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .config import S2VConfig

COMPRESSION = (1, 2, 4)  # proj, proj_2x, proj_4x: kernel = stride = (c, 2c, 2c)


class TokenPositions(NamedTuple):
    """Integer RoPE positions per token (frame, row, col), each [L] int64."""

    frames: Tensor
    rows: Tensor
    cols: Tensor

    @staticmethod
    def cat(parts: list[TokenPositions]) -> TokenPositions:
        return TokenPositions(*(torch.cat([getattr(p, f) for p in parts]) for f in TokenPositions._fields))


def stretched(start: int, stop: int, count: int) -> Tensor:
    """The reference's `linspace(start, stop, count)` truncated to int (numpy, so the rounding matches)."""
    return torch.from_numpy(np.linspace(start, stop, count).astype(np.int64))


def grid_positions(frames: Tensor, rows: Tensor, cols: Tensor) -> TokenPositions:
    """Positions of a (frames, rows, cols) token grid in row-major order."""
    f, r, c = torch.meshgrid(frames, rows, cols, indexing="ij")
    return TokenPositions(f.flatten(), r.flatten(), c.flatten())


class FramePackMotioner(nn.Module):
    """Motion latents [B, C, T, H, W] -> tokens [B, N, dim] (order 1x, 2x, 4x) and their positions."""

    def __init__(self, cfg: S2VConfig) -> None:
        super().__init__()
        self.buckets = cfg.zip_frame_buckets
        kernels = [(c, 2 * c, 2 * c) for c in COMPRESSION]
        self.proj, self.proj_2x, self.proj_4x = (nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=k, stride=k) for k in kernels)

    def forward(self, motion: Tensor) -> tuple[Tensor, TokenPositions]:
        total = sum(self.buckets)
        b, c, t, h, w = motion.shape
        packed = motion.new_zeros(b, c, total, h, w)  # zero-pad (older side) or crop to the last `total` frames
        keep = min(t, total)
        packed[:, :, total - keep:] = motion[:, :, t - keep:]
        tokens, positions, end = [], [], total
        for proj, bucket, comp in zip((self.proj, self.proj_2x, self.proj_4x), self.buckets, COMPRESSION):
            chunk = packed[:, :, end - bucket:end]
            end -= bucket
            tokens.append(proj(chunk).flatten(2).transpose(1, 2))
            # bucket k covers frames -(offset) .. -(offset - bucket + 1), offset = frames up to and including it
            offset = total - end
            frames = -stretched(offset, offset - bucket + 1, bucket // comp)
            rows = stretched(0, h // 2 - 1, h // (2 * comp))
            cols = stretched(0, w // 2 - 1, w // (2 * comp))
            positions.append(grid_positions(frames, rows, cols))
        return torch.cat(tokens, dim=1), TokenPositions.cat(positions)
