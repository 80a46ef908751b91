"""In-process backend: streams share the model weights; each stream's state is its own."""
from __future__ import annotations

import threading
from typing import Any

from ..engine.frame_stream import FrameStream
from ..models.bundle import ModelBundle
from .base import Backend, CapacityError


class LocalBackend(Backend):
    """Runs up to `max_streams` streams of one model in this process (callers drive `next()`)."""

    name = "local"

    def __init__(self, bundle: ModelBundle, max_streams: int = 4) -> None:
        self.bundle = bundle
        self.max_streams = max_streams
        self._open: set[int] = set()
        self._lock = threading.Lock()

    def open(self, prompt: str, overrides: dict[str, Any] | None = None) -> FrameStream:
        with self._lock:
            if len(self._open) >= self.max_streams:
                raise CapacityError(f"at capacity: {len(self._open)} of {self.max_streams} streams in use; try again later")
            stream = FrameStream(self.bundle, prompt, overrides)
            self._open.add(id(stream))
        return stream

    def close(self, stream: FrameStream) -> None:
        with self._lock:
            self._open.discard(id(stream))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.name, "model": self.bundle.name, "streams": len(self._open), "capacity": self.max_streams}
