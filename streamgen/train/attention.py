"""The self-attention of the training forward: a block mask over chunks, per sample.

Block ids per chunk generalise the block-causal mask: a chunk sees every chunk whose id is ≤ its
own. Ids 0, 1, 2, … are the engine's chunk-by-chunk cache path (`BlockCausalAttention`). Chunks that
share an id see each other both ways: that is what a prompt switch does at inference, where the
re-cache pass re-encodes all cached frames together under the new prompt (`engine.execution.recache`).
Frames sit at RoPE positions 0…F−1, the slots of the window cache while F ≤ its capacity.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..models.attention import SelfAttentionContext, TokenGrid, attention
from ..models.rope import Rope3D


def causal_ids(chunks: int) -> list[int]:
    return list(range(chunks))


def recache_ids(chunks: int, switch_chunk: int | None) -> list[int]:
    """Block ids of a window whose chunks before `switch_chunk` were re-cached together at a switch."""
    if switch_chunk is None or switch_chunk <= 1:
        return causal_ids(chunks)
    return [max(0, c - switch_chunk + 1) for c in range(chunks)]


_TABLES: dict[tuple[int, int, int, int], tuple[Tensor, Tensor]] = {}


def rope_tables(rope: Rope3D, frames: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """cos, sin [L, 1, pairs] (float32) of the engine's RoPE phases at frames 0…frames−1, memoised."""
    key = (id(rope), frames, height, width)
    if key not in _TABLES:
        z = rope.phases(torch.arange(frames), height, width)
        _TABLES[key] = (z.real.float().contiguous(), z.imag.float().contiguous())
    return _TABLES[key]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The engine's adjacent-pair rotation (`Rope3D.apply`) in the input's dtype: ~1e-7 from the float64
    original, and several times cheaper in a training step."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class ChunkMaskAttention(SelfAttentionContext):
    """Full-sequence attention with per-sample chunk block ids [B, chunks] (or one shared list)."""

    def __init__(self, rope: Rope3D, frames_per_chunk: int, block_ids: Tensor | list[int]) -> None:
        self.rope = rope
        self.frames_per_chunk = frames_per_chunk
        self.block_ids = torch.as_tensor(block_ids, dtype=torch.long)
        self._mask: Tensor | None = None

    def mask(self, grid: TokenGrid) -> Tensor:
        if self._mask is None:
            chunk = torch.arange(grid.frames).repeat_interleave(grid.tokens_per_frame) // self.frames_per_chunk
            ids = self.block_ids[..., chunk]                                 # [(B,) L]
            m = ids[..., None, :] <= ids[..., :, None]                       # [(B,) Lq, Lk]
            self._mask = m[:, None] if m.dim() == 3 else m                   # SDPA broadcasts [B, 1, Lq, Lk]
        return self._mask

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        cos, sin = rope_tables(self.rope, grid.frames, grid.height, grid.width)
        cos, sin = cos.to(q), sin.to(q)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return attention(q, k, v, mask=self.mask(grid).to(q.device))
