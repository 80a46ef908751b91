"""The bounded hand-off of frames from the generation thread to a session's paced video track.

So that a viewer never watches a backlog (Scope #559): the producer starts a chunk only when the frames
still queued cover about the time that chunk takes to compute (just in time, capped at `chunks`
chunks), which bounds how late any prompt change shows; the consumer drops frames it is too late for,
and a reset drops them all.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MARGIN = 1.5  # start the next chunk when queued frames cover 1.5× its expected compute time, plus a frame


@dataclass(frozen=True)
class FrameAudio:
    """The audio of one frame of an audio-driven stream: played beside it, and what says when it was heard."""

    samples: np.ndarray  # float32 [samples_per_frame] at the model's rate: what drove the frame (silence if late)
    end: int  # position in the session's pushed audio just after this frame's real samples
    heard: float | None  # time.monotonic() its last real sample arrived; None: the frame was driven by silence


@dataclass(frozen=True)
class Frame:
    index: int  # video frame index in the stream (the unit acks use)
    image: np.ndarray  # uint8 [H, W, 3], already at display size
    born: float  # time.monotonic() when its chunk started generating (frame age = latency)
    sound: FrameAudio | None = None  # an avatar session's frame: the audio that drove it


class Pacer:
    """How many queued frames the next chunk should start at: its expected compute time (a moving
    average) in frames, with a margin, capped at `max_chunks - 1` chunks ahead."""

    def __init__(self, fps: float, max_chunks: int) -> None:
        self.fps, self.max_chunks = fps, max_chunks
        self.expected: float | None = None  # seconds per chunk
        self.size = 0  # frames per chunk, from the last chunk

    def ahead(self) -> float:
        if self.expected is None:
            return math.inf  # the first chunk starts at once
        return min((self.max_chunks - 1) * self.size, math.ceil(self.expected * self.fps * MARGIN) + 1)

    def observe(self, seconds: float, frames: int) -> None:
        self.expected = seconds if self.expected is None else 0.7 * self.expected + 0.3 * seconds
        self.size = frames


class FrameQueue:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_room: Callable[[], None] | None = None) -> None:
        """`on_room` is called whenever frames leave (the producer may want to start a chunk)."""
        self._loop = loop
        self._on_room = on_room
        self._frames: deque[Frame] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        return len(self._frames)

    def put(self, frames: list[Frame]) -> bool:
        """Append one chunk (the producer has already waited for room); False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._frames.extend(frames)
        self._wake()
        return True

    def pop(self, late: int = 0) -> tuple[Frame | None, int]:
        """The next frame after dropping up to `late` stale ones (the newest is always kept): (frame, dropped)."""
        with self._lock:
            dropped = min(late, max(0, len(self._frames) - 1))
            for _ in range(dropped):
                self._frames.popleft()
            frame = self._frames.popleft() if self._frames else None
        if frame is not None and self._on_room is not None:
            self._on_room()
        return frame, dropped

    def peek_index(self) -> int | None:
        with self._lock:
            return self._frames[0].index if self._frames else None

    def flush(self) -> int:
        """Drop every queued frame (they belong to a timeline that was reset); returns how many."""
        with self._lock:
            count = len(self._frames)
            self._frames.clear()
        return count

    def close(self) -> None:
        """Release a blocked producer for good."""
        with self._lock:
            self._closed = True
        self._wake()

    async def wait(self, timeout: float) -> bool:
        """Wait until a frame is queued (or `timeout`); True when one is."""
        self._ready.clear()
        if self._frames or self._closed:
            return bool(self._frames)
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return bool(self._frames)

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is gone: the server is shutting down
            pass
