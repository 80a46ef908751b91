"""In-process backend: streams share the model weights and one engine loop; each stream's state is its own."""
from __future__ import annotations

import threading
from typing import Any

from ..bundles.bundle import ModelBundle
from ..engine.frame_stream import FrameStream
from ..engine.scheduler import ChunkSink, Engine
from .base import Backend, CapacityError
from .driver import EngineHandle, StreamHandle
from .names import SCHEDULERS


class LocalBackend(Backend):
    """Up to `max_streams` streams of one model in this process. Streams handed to `start` run on the
    model's engine loop (batched across streams unless `batch=False`), or with scheduler "threads" each
    on a thread of its own (what streamgen did before the engine loop; kept to measure against);
    others are driven by their caller through `next()` (render jobs, benchmarks)."""

    name = "local"

    def __init__(self, bundle: ModelBundle, max_streams: int = 4, batch: bool = True, scheduler: str = "engine") -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
        self.bundle = bundle
        self.max_streams = max_streams
        self.scheduler = scheduler
        self.engine = Engine(bundle.dit, batch=batch, name=f"engine-{bundle.name}")
        self._open: set[int] = set()
        self._lock = threading.Lock()

    def open(self, prompt: str, overrides: dict[str, Any] | None = None) -> FrameStream:
        with self._lock:
            if len(self._open) >= self.max_streams:
                raise CapacityError(f"at capacity: {len(self._open)} of {self.max_streams} streams in use; try again later")
            stream = FrameStream(self.bundle, prompt, overrides)
            self._open.add(id(stream))
        return stream

    def start(self, name: str, stream: FrameStream, sink: ChunkSink) -> StreamHandle:
        if self.scheduler == "threads":
            return super().start(name, stream, sink)
        self.engine.start()
        return EngineHandle(self.engine, self.engine.add(name, stream, sink))

    def close(self, stream: FrameStream) -> None:
        with self._lock:
            self._open.discard(id(stream))

    def shutdown(self) -> None:
        self.engine.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"backend": self.name, "model": self.bundle.name, "streams": len(self._open), "capacity": self.max_streams,
                    "engine": self.engine.stats()}
