"""Deep Forcing's Deep Sink (spec §c.3): a large frame sink whose cached (roped) keys are moved in
time on every eviction, by rotating only their temporal RoPE channels, so the sink stays a fixed
distance behind the present."""
from __future__ import annotations

from dataclasses import replace

from ..models.rope import Rope3D
from .kv import CallSpec, KVCache
from .window import WindowCall, WindowPlan, WindowSinkPolicy


class DeepSinkPolicy(WindowSinkPolicy):
    """Window `capacity_frames` with `sink_frames` re-aligned sink frames (absolute RoPE elsewhere)."""

    name = "deep_sink"

    def __init__(self, capacity_frames: int = 21, sink_frames: int = 14, global_sink: bool = True,
                 rope_overflow: str = "error") -> None:
        super().__init__(capacity_frames, sink_frames, global_sink, rope_overflow)

    def begin(self, cache: KVCache, call: CallSpec, rope: Rope3D) -> WindowCall:
        ctx = super().begin(cache, call, rope)
        if call.role == "recache" and ctx.plan.write_start == 0 and cache.state.get("sink_start_frame") is not None:
            cache.state["sink_start_frame"] = call.start_frame  # the sink was rebuilt at its absolute frames
        if ctx.plan.evict:
            tail = self.capacity_frames - self.sink_frames
            desired = call.start_frame - tail - self.sink_frames
            current = cache.state.get("sink_start_frame")
            shift = 0 if current is None else desired - current  # the first eviction only records it
            cache.state["sink_start_frame"] = desired
            ctx.plan = replace(ctx.plan, sink_shift=shift)
        return ctx

    def evict_(self, cache: KVCache, layer: int, plan: WindowPlan, rope: Rope3D) -> None:
        rope.shift_time_(cache.k[layer][:, cache.tokens(0, self.sink_frames)], plan.sink_shift)
        super().evict_(cache, layer, plan, rope)
