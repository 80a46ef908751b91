"""Rebuilding a KV cache after a fault or a move, from recent latents the driver kept.

This is the prompt re-cache idea (`engine.execution.recache`, LongLive spec §d) aimed at an *empty*
cache: the newest recent chunks that fit the cache (≤ capacity frames) are encoded again at the
cache's noise level, oldest first, each call attending to the chunks re-encoded before it — the
same causal order in which they were first generated — and written to slots [0, n) as if frames
[end−n, end) had just been generated. No KV crosses the wire and no history is replayed beyond the
window, so a resume costs capacity/chunk forwards per cache (3 for `ema_sink`, 4 for
`window_sink`), whatever the stream's length.

What it does not recover: a never-evicted sink (`window_sink` frames 0–2, the EMA of `ema_sink`)
becomes the oldest recent frames, and the first re-encoded chunk no longer sees what preceded it.
The stream therefore continues *coherently* from its last frames (same chunk index and position,
prompt, noise counters) but not bit-identically to an uninterrupted run. Replaying the whole stream
would be exact but costs O(length); re-cache is O(window), which is what "resume within seconds" needs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...cache.kv import CallSpec, KVCache
from ...engine.execution import RecentFrames
from ...models.dit import CrossKV
from ...sampling.denoiser import Denoiser


def fill_recent(capacity: int, chunks: list[Tensor]) -> RecentFrames:
    recent = RecentFrames(capacity)
    for x in chunks:
        recent.push(x)
    return recent


def rebuild_cache(denoiser: Denoiser, cache: KVCache, recent: RecentFrames, cross: CrossKV, end_frame: int, t: float) -> int:
    """Reset `cache` and re-encode the newest recent chunks ending at `end_frame` (at most the cache's
    capacity) chunk by chunk at level t; returns the frames cached. Afterwards the cache's counters
    say frames [end_frame − n, end_frame) are cached."""
    cache.reset()
    limit = min(cache.capacity_frames, end_frame)
    kept: list[Tensor] = []
    frames = 0
    for x in reversed(recent.chunks):
        if frames + x.shape[1] > limit:
            break
        kept.insert(0, x)
        frames += x.shape[1]
    if not kept:
        return 0
    start = end_frame - frames
    cache.global_end, cache.local_end = start, 0
    for x in kept:
        denoiser.one(x, torch.full(x.shape[:2], float(t)), cross, cache, CallSpec(start, x.shape[1], "denoise"))
        start += x.shape[1]
    return frames
