"""The backend seam: `serve` and `render` open frame streams here and never touch threads or Ray."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..engine.frame_stream import FrameStream
from ..models.bundle import ModelBundle


class CapacityError(RuntimeError):
    """No room for another stream; the message is the reason given to the client."""


class Backend(ABC):
    """Opens and closes frame streams of one model."""

    name: str
    bundle: "ModelBundle"  # the model every stream of this backend runs

    @abstractmethod
    def open(self, prompt: str, overrides: dict[str, Any] | None = None) -> FrameStream:
        """A new stream (raises CapacityError when full, ValueError for bad prompts or settings)."""

    @abstractmethod
    def close(self, stream: FrameStream) -> None:
        """Free a stream's resources; closing twice is harmless."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Open streams and capacity, for /health and /metrics."""
