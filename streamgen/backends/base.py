"""The backend seam: `serve` and `render` open frame streams here and never touch threads or Ray."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..bundles.bundle import ModelBundle
from ..engine.frame_stream import FrameStream
from ..engine.scheduler import ChunkSink
from .driver import StreamHandle, ThreadDriver


class CapacityError(RuntimeError):
    """No room for another stream; the message is the reason given to the client."""


class StreamFailedError(RuntimeError):
    """A stream cannot continue (its actors died and could not be replaced, or a stage raised)."""


class Backend(ABC):
    """Opens and closes frame streams of one model."""

    name: str
    bundle: "ModelBundle"  # the model every stream of this backend runs

    @abstractmethod
    def open(self, prompt: str, overrides: dict[str, Any] | None = None) -> FrameStream:
        """A new stream (raises CapacityError when full, ValueError for bad prompts or settings)."""

    def start(self, name: str, stream: FrameStream, sink: ChunkSink) -> StreamHandle:
        """Generate `stream`'s chunks for `sink` until stopped (default: a thread driving `next()`)."""
        return ThreadDriver(name, stream, sink)

    def shutdown(self) -> None:
        """Release what the backend holds (threads, actors); idempotent."""

    @abstractmethod
    def close(self, stream: FrameStream) -> None:
        """Free a stream's resources; closing twice is harmless."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Open streams and capacity, for /health and /metrics."""
