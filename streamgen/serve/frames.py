"""The bounded hand-off of frames from a session's generation thread to its paced video track.

So that a viewer never watches a backlog (Scope #559): the producer starts a chunk only when the frames
still queued cover about the time that chunk takes to compute (just in time, capped at `chunks`
chunks), which bounds how late any prompt change shows; the consumer drops frames it is too late for,
and a reset drops them all.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    index: int  # video frame index in the stream (the unit acks use)
    image: np.ndarray  # uint8 [H, W, 3], already at display size
    born: float  # time.monotonic() when its chunk started generating (frame age = latency)


class FrameQueue:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._frames: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        return len(self._frames)

    def wait_room(self, ahead: int) -> bool:
        """Block until at most `ahead` frames are queued (the producer's cue to start a chunk); False once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or len(self._frames) <= ahead)
            return not self._closed

    def put(self, frames: list[Frame]) -> bool:
        """Append one chunk (the producer has already waited for room); False once closed."""
        with self._cond:
            if self._closed:
                return False
            self._frames.extend(frames)
        self._wake()
        return True

    def pop(self, late: int = 0) -> tuple[Frame | None, int]:
        """The next frame after dropping up to `late` stale ones (the newest is always kept): (frame, dropped)."""
        with self._cond:
            dropped = min(late, max(0, len(self._frames) - 1))
            for _ in range(dropped):
                self._frames.popleft()
            frame = self._frames.popleft() if self._frames else None
            self._cond.notify_all()
        return frame, dropped

    def peek_index(self) -> int | None:
        with self._cond:
            return self._frames[0].index if self._frames else None

    def flush(self) -> int:
        """Drop every queued frame (they belong to a timeline that was reset); returns how many."""
        with self._cond:
            count = len(self._frames)
            self._frames.clear()
            self._cond.notify_all()
        return count

    def close(self) -> None:
        """Release a blocked producer for good."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
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
