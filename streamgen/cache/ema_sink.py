"""Reward Forcing's EMA sink (spec §c.4): un-roped key cache, window-relative RoPE, sink ← EMA of
evicted frames. Positions never exceed the window, so streams are unbounded in length."""
from __future__ import annotations

from typing import Any

from ..models.rope import Rope3D
from .kv import CallSpec, KVCache
from .window import WindowPlan, WindowSinkPolicy


class EmaSinkPolicy(WindowSinkPolicy):
    """Window of `capacity_frames` whose first `sink_frames` slots hold an EMA of evicted frames."""

    name = "ema_sink"

    def __init__(self, capacity_frames: int = 9, sink_frames: int = 3, alpha: float = 0.999, global_sink: bool = True) -> None:
        super().__init__(capacity_frames, sink_frames, global_sink=global_sink, rope="relative")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "alpha": self.alpha}

    def plan(self, cache: KVCache, call: CallSpec) -> WindowPlan:
        plan = super().plan(cache, call)
        if plan.evict and plan.evict != self.sink_frames:  # checked before any counter moves
            raise ValueError(f"ema_sink blends evicted frames into the sink slot by slot: evictions must be exactly "
                             f"sink_frames={self.sink_frames} frames, got {plan.evict} (capacity − sink must be a multiple of the chunk)")
        return plan

    def evict_(self, cache: KVCache, layer: int, plan: WindowPlan, rope: Rope3D) -> None:
        """Blend the evicted frames into the sink slot by slot (same count), then move the rest down."""
        sink = self.sink_frames
        for buf in (cache.k[layer], cache.v[layer]):
            evicted = buf[:, cache.tokens(sink, 2 * sink)]
            buf[:, cache.tokens(0, sink)] = self.alpha * buf[:, cache.tokens(0, sink)] + (1 - self.alpha) * evicted
        super().evict_(cache, layer, plan, rope)
