"""Preallocated per-layer KV buffers with frame-granular fill counters (spec §b.5).

Memory is fixed at construction: a stream that runs for hours never grows its cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class CallSpec:
    """One DiT call as the cache sees it: which latent frames, and why.

    role: "denoise" (a sampler step), "rerun" (clean-context rerun at t=0) or "recache" (prompt switch).
    """

    start_frame: int
    num_frames: int
    role: str = "denoise"

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.num_frames


@dataclass
class KVCache:
    """K/V buffers [B, capacity·S, heads, head_dim] per layer; counters count latent frames."""

    k: list[Tensor]
    v: list[Tensor]
    tokens_per_frame: int
    global_end: int = 0  # absolute frame one past the last frame written
    local_end: int = 0  # slot one past the last filled slot
    state: dict[str, Any] = field(default_factory=dict)  # policy bookkeeping (sink position, …)

    @classmethod
    def allocate(cls, num_layers: int, batch: int, capacity_frames: int, tokens_per_frame: int,
                 heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, capacity_frames * tokens_per_frame, heads, head_dim)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   tokens_per_frame=tokens_per_frame)

    @property
    def capacity_frames(self) -> int:
        return self.k[0].shape[1] // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def tokens(self, first_frame: int, end_frame: int) -> slice:
        return slice(first_frame * self.tokens_per_frame, end_frame * self.tokens_per_frame)

    def end_index(self) -> list[int]:
        """[global_end_index, local_end_index] in tokens, as the reference stores them."""
        return [self.global_end * self.tokens_per_frame, self.local_end * self.tokens_per_frame]

    def zero_(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()

    def reset(self) -> None:
        self.zero_()
        self.global_end = self.local_end = 0
        self.state.clear()

    def clone(self) -> "KVCache":
        return KVCache([t.clone() for t in self.k], [t.clone() for t in self.v], self.tokens_per_frame,
                       self.global_end, self.local_end, {k: _copy(v) for k, v in self.state.items()})


def _copy(value: Any) -> Any:
    """Deep copy of policy state: tensors cloned, lists copied element-wise, scalars as they are."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
