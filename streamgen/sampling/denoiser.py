"""One DiT call against a cache: layouts, the cache policy's attention context, batching of
independent calls (timestep slots, streams) into a single forward."""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.kv import CallSpec, KVCache
from ..cache.policy import CachePolicy
from ..lru import LRU
from ..models.attention import BatchedAttention
from ..models.dit import CrossKV, WanDiT


@dataclass
class DiTCall:
    """Inputs of one call in the pipeline layout: x [B, F, C, H, W], t [B, F], against `cache` under `policy`;
    `drive` [B, F, D] for a driven DiT (per-frame audio features), None otherwise."""

    x: Tensor
    t: Tensor
    cross: CrossKV
    cache: KVCache
    call: CallSpec
    policy: CachePolicy
    drive: Tensor | None = None

    @property
    def batch_key(self) -> tuple:
        """Calls with equal keys can share one forward: same latent geometry, frame count, text length and drive."""
        drive = None if self.drive is None else tuple(self.drive.shape[2:])
        return (tuple(self.x.shape[1:]), self.x.dtype, self.x.device, tuple(self.cross[0][0].shape[1:]), drive)


@torch.no_grad()
def forward(model: WanDiT, calls: list[DiTCall]) -> list[Tensor]:
    """Run calls with equal batch keys as one forward; each keeps its own cache, policy and position."""
    contexts = [c.policy.begin(c.cache, c.call, model.rope) for c in calls]
    sizes = [c.x.shape[0] for c in calls]
    x = torch.cat([c.x for c in calls]).transpose(1, 2)
    t = torch.cat([c.t for c in calls]).to(x.device)
    cross = [tuple(torch.cat(parts) for parts in zip(*layer)) for layer in zip(*(c.cross for c in calls))]
    attn = contexts[0] if len(calls) == 1 else BatchedAttention(contexts, sizes)
    drive = {} if calls[0].drive is None else {"drive": torch.cat([c.drive for c in calls]).to(x.device)}
    return list(model(x, t, cross, attn, **drive).transpose(1, 2).split(sizes))


class Denoiser:
    """Binds a model to a cache policy; returns the raw flow prediction [B, F, C, H, W]."""

    def __init__(self, model: WanDiT, policy: CachePolicy, cross_memo: int = 4) -> None:
        self.model = model
        self.policy = policy
        self.calls = 0  # forwards this denoiser's calls took part in
        self._cross: LRU[CrossKV] = LRU(cross_memo)

    @torch.no_grad()
    def cross_kv(self, key: Hashable, context: Tensor) -> CrossKV:
        """Cross-attention K/V of a context, computed once per key (a prompt or blend step)."""
        return self._cross.get(key, lambda: self.model.cross_kv(context))

    def call(self, x: Tensor, t: Tensor, cross: CrossKV, cache: KVCache, spec: CallSpec,
             drive: Tensor | None = None) -> DiTCall:
        return DiTCall(x, t, cross, cache, spec, self.policy, drive)

    def __call__(self, calls: list[DiTCall]) -> list[Tensor]:
        """Run calls with equal frame counts as one forward."""
        self.calls += 1
        return forward(self.model, calls)

    def one(self, x: Tensor, t: Tensor, cross: CrossKV, cache: KVCache, call: CallSpec) -> Tensor:
        return self([self.call(x, t, cross, cache, call)])[0]
