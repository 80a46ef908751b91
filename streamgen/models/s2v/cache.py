"""LiveAvatar's self-attention caches (spec §2.6–2.7): per denoising step a ring of that step's noisy,
roped keys; one cond ("sink") cache of un-roped reference + motion keys, re-roped at every call with the
reference shifted by the rolling-sink offset."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import SelfAttentionContext, TokenGrid, attention
from ..rope import rotate
from .motion import TokenPositions
from .rope import S2VRope


def _buffers(layers: int, batch: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device | str | None) -> list[Tensor]:
    return [torch.zeros(batch, tokens, heads, head_dim, dtype=dtype, device=device) for _ in range(layers)]


@dataclass
class StepRing:
    """One denoising step's ring of roped noisy keys/values, per layer [B, tokens, heads, head_dim]."""

    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def allocate(cls, layers: int, batch: int, tokens: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> StepRing:
        args = (layers, batch, tokens, heads, head_dim, dtype, device)
        return cls(_buffers(*args), _buffers(*args))

    @property
    def tokens(self) -> int:
        return self.k[0].shape[1]


@dataclass
class CondCache:
    """Un-roped cond keys/values per layer, the filled length `end`, and the cond tokens' positions
    with a mask of the reference tokens (the ones the rolling sink moves)."""

    k: list[Tensor]
    v: list[Tensor]
    end: int = 0
    positions: TokenPositions | None = None
    is_ref: Tensor | None = None

    @classmethod
    def allocate(cls, layers: int, batch: int, tokens: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> CondCache:
        args = (layers, batch, tokens, heads, head_dim, dtype, device)
        return cls(_buffers(*args), _buffers(*args))

    def phases(self, rope: S2VRope, shift: int) -> Tensor:
        """RoPE phases of the cond tokens with the reference moved `shift` frames later."""
        p = self.positions
        return rope.token_phases(p.frames + shift * self.is_ref.long(), p.rows, p.cols)


def ref_shift(frame_start: int, rd: int, ref_frame: int) -> int:
    """Rolling sink: the reference sits at max(ref_frame, frame_start + rd), i.e. shifted by this much."""
    return max(0, frame_start - (ref_frame - rd))


class PrefillAttention(SelfAttentionContext):
    """The sink prefill: cond tokens attend among themselves (roped); un-roped k and v are stored."""

    def __init__(self, rope: S2VRope, cache: CondCache) -> None:
        self.cache = cache
        self.phases = cache.phases(rope, 0)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        n = k.shape[1]
        self.cache.k[layer][:, :n] = k
        self.cache.v[layer][:, :n] = v
        self.cache.end = max(self.cache.end, n)
        return attention(rotate(q, self.phases), rotate(k, self.phases), v)


class StreamAttention(SelfAttentionContext):
    """One denoising call of a block at `frame_start`: write its roped noisy keys into the step's ring at
    (frame_start·S) mod ring length, attend to the ring's filled part plus the re-roped cond cache."""

    def __init__(self, rope: S2VRope, ring: StepRing, cond: CondCache, frame_start: int, shift: int) -> None:
        self.rope, self.ring, self.cond, self.frame_start = rope, ring, cond, frame_start
        self.cond_phases = cond.phases(rope, shift)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        frames = range(self.frame_start, self.frame_start + grid.frames)
        q = self.rope.apply(q, frames, grid.height, grid.width)
        k = self.rope.apply(k, frames, grid.height, grid.width)
        begin, n, size = self.frame_start * grid.tokens_per_frame, k.shape[1], self.ring.tokens
        start = begin % size
        if start + n > size:
            raise ValueError(f"a block of {n} tokens at ring offset {start} straddles the {size}-token ring")
        self.ring.k[layer][:, start:start + n] = k
        self.ring.v[layer][:, start:start + n] = v
        filled = min(begin + n, size)
        end = self.cond.end
        keys = torch.cat([self.ring.k[layer][:, :filled], rotate(self.cond.k[layer][:, :end], self.cond_phases)], dim=1)
        values = torch.cat([self.ring.v[layer][:, :filled], self.cond.v[layer][:, :end]], dim=1)
        return attention(q, keys, values)
