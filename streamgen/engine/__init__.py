"""Per-stream state and execution: `Stream`, prompt timeline, noise, exact / timestep-slot / rolling."""
from .stream import Ack, Chunk, Stream, StreamConfig

__all__ = ["Ack", "Chunk", "Stream", "StreamConfig"]
