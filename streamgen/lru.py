"""A small least-recently-used memo: prompt embeddings, cross-attention K/V per context."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Keeps the `size` most recently used values; `get(key, make)` computes a missing one once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        if key in self.entries:
            self.entries.move_to_end(key)
        else:
            self.entries[key] = make()
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return self.entries[key]
