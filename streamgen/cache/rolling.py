"""Rolling Forcing's cache (spec §c.2): only each window's oldest block is cached; block 0 is an
un-roped anchor that is never evicted and is re-positioned in time just before the working cache."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.attention import SelfAttentionContext, TokenGrid, attention
from ..models.rope import Rope3D
from .kv import CallSpec, KVCache
from .policy import CachePolicy


class RollingCall(SelfAttentionContext):
    """One window call (role "denoise", all window frames) or one clean rerun of its first block."""

    def __init__(self, policy: "RollingAnchorPolicy", cache: KVCache, call: CallSpec, write_start: int, rope: Rope3D) -> None:
        self.policy, self.cache, self.call, self.write_start, self.rope = policy, cache, call, write_start, rope

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        p, cache, call = self.policy, self.cache, self.call
        blk, s = p.block_frames, cache.tokens_per_frame
        rope = lambda x, first: self.rope.apply(x, range(first, first + x.shape[1] // s), grid.height, grid.width)  # noqa: E731
        is_anchor = call.start_frame == 0
        roped_k = rope(k, call.start_frame)
        stored = cache.tokens(self.write_start, self.write_start + blk)
        cache.k[layer][:, stored] = (k if is_anchor else roped_k)[:, : blk * s]
        cache.v[layer][:, stored] = v[:, : blk * s]
        q = rope(q, call.start_frame)
        if is_anchor:  # warm-up windows and block 0's rerun see only themselves
            return attention(q, roped_k, v)
        if call.role == "rerun":
            end = self.write_start + blk
            first = max(0, end - p.attention_frames)
            keys, values = cache.k[layer][:, first * s: end * s], cache.v[layer][:, first * s: end * s]
            if first == 0:
                keys = torch.cat([rope(keys[:, : blk * s], 0), keys[:, blk * s:]], dim=1)
            return attention(q, keys, values)
        working = max(0, min(self.write_start - blk, p.attention_frames - call.num_frames - blk))
        work = cache.tokens(self.write_start - working, self.write_start)
        anchor = rope(cache.k[layer][:, : blk * s], call.start_frame - working - blk)
        keys = torch.cat([anchor, cache.k[layer][:, work], roped_k], dim=1)
        values = torch.cat([cache.v[layer][:, : blk * s], cache.v[layer][:, work], v], dim=1)
        return attention(q, keys, values)


class RollingAnchorPolicy(CachePolicy):
    """`capacity_frames` cache of clean blocks; attention spans at most `attention_frames` frames."""

    name = "rolling_anchor"

    def __init__(self, capacity_frames: int = 24, attention_frames: int = 21, block_frames: int = 3) -> None:
        super().__init__(capacity_frames)
        if capacity_frames % block_frames or capacity_frames < 2 * block_frames:
            raise ValueError(f"capacity_frames ({capacity_frames}) must be a multiple of block_frames ({block_frames}), "
                             "at least the anchor plus one block")
        self.attention_frames = attention_frames
        self.block_frames = block_frames

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "attention_frames": self.attention_frames, "block_frames": self.block_frames}

    def begin(self, cache: KVCache, call: CallSpec, rope: Rope3D) -> RollingCall:
        blk = self.block_frames
        end = call.start_frame + blk  # only the window's first block is cached
        local = cache.local_end + end - cache.global_end
        if end > cache.global_end:
            if local > cache.capacity_frames:  # drop the oldest block after the anchor, move the rest down
                for buf in (*cache.k, *cache.v):
                    buf[:, cache.tokens(blk, cache.capacity_frames - blk)] = buf[:, cache.tokens(2 * blk, cache.capacity_frames)].clone()
                local = cache.capacity_frames
            cache.global_end, cache.local_end = end, local
        return RollingCall(self, cache, call, local - blk, rope)
