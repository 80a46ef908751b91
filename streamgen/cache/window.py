"""Window + frame-sink caches (Self-Forcing, CausVid, LongLive), the write rule of spec §b.5.

A call of n frames ending at absolute frame E either extends the stream (E > global_end: new slots,
evicting the oldest non-sink frames when full, a memmove) or recomputes frames already in the cache
(same-chunk steps, the clean rerun, a prompt re-cache: slots overwritten in place, counters kept).
Every call attends to all filled slots. Subclasses change only where keys sit in time
(`store_keys`, `position`) and what eviction does to the sink (`evict_`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..models.attention import SelfAttentionContext, TokenGrid, attention
from ..models.rope import Rope3D
from .kv import CallSpec, KVCache
from .policy import CacheFullError, CachePolicy


@dataclass(frozen=True)
class WindowPlan:
    """Slot arithmetic of one call, computed once and applied to every layer."""

    call: CallSpec
    evict: int  # frames dropped right after the sink before writing
    write_start: int  # first slot written
    skip: int  # leading frames of the call not written (protected sink on recompute)
    end: int  # attention covers slots [0, end)
    sink_shift: int = 0  # frames to move the sink's keys in time (Deep Sink re-alignment)


class WindowCall(SelfAttentionContext):
    """Applies one plan layer by layer: evict, write, gather, position, attend."""

    def __init__(self, policy: "WindowSinkPolicy", cache: KVCache, plan: WindowPlan, rope: Rope3D) -> None:
        self.policy, self.cache, self.plan, self.rope = policy, cache, plan, rope

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        policy, cache, plan = self.policy, self.cache, self.plan
        if plan.evict:
            policy.evict_(cache, layer, plan, self.rope)
        k = policy.store_keys(k, plan, grid, self.rope)
        s = cache.tokens_per_frame
        dst = cache.tokens(plan.write_start, plan.end)
        cache.k[layer][:, dst] = k[:, plan.skip * s:]
        cache.v[layer][:, dst] = v[:, plan.skip * s:]
        keys, values = cache.k[layer][:, : plan.end * s], cache.v[layer][:, : plan.end * s]
        q, keys = policy.position(q, keys, plan, grid, self.rope)
        return attention(q, keys, values)


class WindowSinkPolicy(CachePolicy):
    """LongLive: `capacity_frames` window whose first `sink_frames` are never evicted.

    rope="absolute" (LongLive 1.0): keys roped at their absolute frame when written. Absolute
    positions end at the RoPE table (`rope_max_frames`, 1024 for Wan): past it the stream stops with
    CacheFullError unless rope_overflow="extend" (positions the model never saw).
    rope="relative" (LongLive-infinity): keys cached un-roped and roped at every call by slot, so
    positions never leave [0, capacity) and streams are unbounded.
    global_sink=False makes a prompt re-cache rebuild the sink too (LongLive training setting).
    """

    name = "window_sink"
    evicts = True

    def __init__(self, capacity_frames: int = 12, sink_frames: int = 3, global_sink: bool = True,
                 rope_overflow: str = "error", rope: str = "absolute") -> None:
        super().__init__(capacity_frames)
        if rope not in ("absolute", "relative"):
            raise ValueError(f"rope must be 'absolute' or 'relative', got {rope!r}")
        self.slot_relative = rope == "relative"
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(f"sink_frames must be in [0, capacity_frames), got {sink_frames}")
        if rope_overflow not in ("error", "extend"):
            raise ValueError(f"rope_overflow must be 'error' or 'extend', got {rope_overflow!r}")
        self.sink_frames = sink_frames
        self.global_sink = global_sink
        self.rope_overflow = rope_overflow

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sink_frames": self.sink_frames, "global_sink": self.global_sink,
                "rope_overflow": self.rope_overflow, "rope": "relative" if self.slot_relative else "absolute"}

    def plan(self, cache: KVCache, call: CallSpec) -> WindowPlan:
        n, cap, sink = call.num_frames, cache.capacity_frames, self.sink_frames
        extends = call.end_frame > cache.global_end
        if extends and self.evicts and n > cap - sink:
            raise ValueError(f"a call of {n} frames does not fit beside a {sink}-frame sink in a {cap}-frame cache")
        evict = 0
        if extends and cache.local_end + n > cap:
            if not self.evicts:
                raise CacheFullError(
                    f"policy {self.name!r} holds {cap} frames and never evicts; frame {call.end_frame} does not fit. "
                    "Use a bounded policy (window_sink, ema_sink, deep_sink) for streams longer than the cache.")
            evict = n + cache.local_end - cap
        end = cache.local_end + call.end_frame - cache.global_end - evict
        if end - n < 0:
            raise ValueError(f"call {call} reaches before the first cached slot")
        protect = call.role == "recache" and call.start_frame > 0 and self.global_sink  # keep the sink's original prompt
        skip = max(0, sink - (end - n)) if protect else 0
        return WindowPlan(call, evict, end - n + skip, skip, end)

    def begin(self, cache: KVCache, call: CallSpec, rope: Rope3D) -> WindowCall:
        if not self.slot_relative and call.end_frame > rope.max_frames and self.rope_overflow == "error":
            raise CacheFullError(
                f"policy {self.name!r} uses absolute RoPE positions and frame {call.end_frame} is past the "
                f"{rope.max_frames}-frame RoPE table the model was built with; use a slot-relative policy "
                "(ema_sink) for unbounded streams, or rope_overflow='extend' to extrapolate positions.")
        plan = self.plan(cache, call)
        if call.end_frame > cache.global_end:
            cache.global_end = call.end_frame
            cache.local_end = plan.end
        return WindowCall(self, cache, plan, rope)

    def prepare_recache(self, cache: KVCache) -> None:
        if not self.global_sink:
            cache.zero_()

    # --- hooks -------------------------------------------------------------------------------
    def evict_(self, cache: KVCache, layer: int, plan: WindowPlan, rope: Rope3D) -> None:
        """Drop `plan.evict` frames after the sink and move the rest down (memmove, not a ring)."""
        sink, kept_end = self.sink_frames, plan.end - plan.call.num_frames
        for buf in (cache.k[layer], cache.v[layer]):
            buf[:, cache.tokens(sink, kept_end)] = buf[:, cache.tokens(sink + plan.evict, kept_end + plan.evict)].clone()

    def store_keys(self, k: Tensor, plan: WindowPlan, grid: TokenGrid, rope: Rope3D) -> Tensor:
        """Absolute: roped at their frames when written. Relative: stored un-roped."""
        if self.slot_relative:
            return k
        return rope.apply(k, range(plan.call.start_frame, plan.call.end_frame), grid.height, grid.width)

    def position(self, q: Tensor, keys: Tensor, plan: WindowPlan, grid: TokenGrid, rope: Rope3D) -> tuple[Tensor, Tensor]:
        """Absolute: q at its frames. Relative: every key at its slot, q at its own (last) slots."""
        if self.slot_relative:
            q = rope.apply(q, range(plan.end - plan.call.num_frames, plan.end), grid.height, grid.width)
            return q, rope.apply(keys, range(plan.end), grid.height, grid.width)
        return rope.apply(q, range(plan.call.start_frame, plan.call.end_frame), grid.height, grid.width), keys


class FullCachePolicy(WindowSinkPolicy):
    """Self-Forcing / CausVid: everything generated so far, no eviction; full at `capacity_frames`."""

    name = "full"
    evicts = False

    def __init__(self, capacity_frames: int = 21, rope_overflow: str = "error") -> None:
        super().__init__(capacity_frames, sink_frames=0, rope_overflow=rope_overflow)
