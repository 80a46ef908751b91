"""The policy seam: a cache policy decides which slots are written, evicted and attended, and which
RoPE positions keys and queries get. Policies are selected by name (`make_policy`)."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..models.attention import SelfAttentionContext
from ..models.rope import Rope3D
from .kv import CallSpec, KVCache


class CacheFullError(RuntimeError):
    """A stream ran past what its policy can hold or position; the message says what to use instead."""


class CachePolicy(ABC):
    """Base of every policy; one instance may serve many caches (it holds settings, not state)."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type["CachePolicy"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            CachePolicy.registry[cls.name] = cls

    def __init__(self, capacity_frames: int) -> None:
        if capacity_frames <= 0:
            raise ValueError(f"capacity_frames must be positive, got {capacity_frames}")
        self.capacity_frames = capacity_frames

    def allocate(self, num_layers: int, batch: int, tokens_per_frame: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        return KVCache.allocate(num_layers, batch, self.capacity_frames, tokens_per_frame, heads, head_dim, dtype, device)

    @abstractmethod
    def begin(self, cache: KVCache, call: CallSpec, rope: Rope3D) -> SelfAttentionContext:
        """Plan one DiT call (update counters once) and return the per-layer attention context."""

    def prepare_recache(self, cache: KVCache) -> None:
        """Called before a prompt re-cache pass; policies that rebuild the sink clear state here."""

    def settings(self) -> dict[str, Any]:
        return {"policy": self.name, "capacity_frames": self.capacity_frames}


def make_policy(name: str, **settings: Any) -> CachePolicy:
    """Build a policy by its config name; an unknown name lists the known ones."""
    from . import compression, deep_sink, ema_sink, rolling, window  # noqa: F401  (registration)

    if name not in CachePolicy.registry:
        raise ValueError(f"unknown cache policy {name!r}; known: {', '.join(sorted(CachePolicy.registry))}")
    cls = CachePolicy.registry[name]
    known = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(settings) - set(known))
    if unknown:  # a ValueError naming the settings, not the constructor's TypeError
        raise ValueError(f"unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)} for cache policy {name!r}; "
                         f"known: {', '.join(known)}")
    return cls(**settings)
