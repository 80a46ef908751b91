"""An avatar session's audio buffer, with arrival times: the engine's `AudioBuffer` (bounded, never waits)
plus a ledger of which push every buffered sample came in with, and when.

Why: a frame's audio must say when it was heard (A/V latency = frame sent − its audio's arrival) and where
it ends in the session's pushed audio (playback positions of an utterance). Positions count every sample
ever pushed; each sample is either played (taken by a chunk) or dropped (a clear), in push order, so
`consumed` — played plus dropped — is one cursor through that stream.

Each `take` (one per chunk, on the generation thread, when the chunk starts) is recorded as a `Take`; the
session pops them in the same order as it is delivered the chunks (the local engine delivers every chunk it
starts, in order, unless the stream is removed, after which nothing is delivered).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..engine.driven import AudioBuffer


@dataclass(frozen=True)
class Take:
    """What one chunk took: per frame (end position of its real samples, arrival of the last of them or
    None when it had none); `clears`: how many clears had happened when it took (a later clear interrupts it)."""

    frames: list[tuple[int, float | None]]
    real: int
    clears: int


class TimedAudioBuffer(AudioBuffer):
    def __init__(self, sample_rate: int, capacity: int | None, samples_per_frame: int) -> None:
        super().__init__(sample_rate, capacity)
        self.samples_per_frame = samples_per_frame
        self.clears = 0
        self._ends: list[int] = []  # position just after each push still (partly) buffered ...
        self._times: list[float] = []  # ... and when it arrived
        self._consumed = 0
        self._takes: deque[Take] = deque()
        self._ledger = threading.Lock()  # taken around the parent's own lock: ledger and buffer change together

    @property
    def position(self) -> int:
        """Samples pushed so far: where the next push starts."""
        with self._ledger:
            return self.counts["pushed"]

    def push(self, samples: np.ndarray) -> None:
        with self._ledger:
            super().push(samples)
            end = self.counts["pushed"]
            if not self._ends or self._ends[-1] < end:
                self._ends.append(end)
                self._times.append(time.monotonic())

    def take(self, n: int) -> tuple[np.ndarray, int]:
        with self._ledger:
            samples, real = super().take(n)
            start, size = self._consumed, self.samples_per_frame
            frames = []
            for i in range(n // size):
                end = start + min(real, (i + 1) * size)
                frames.append((end, self._arrival(end - 1) if real > i * size else None))
            self._consumed += real
            self._forget()
            self._takes.append(Take(frames, real, self.clears))
        return samples, real

    def clear(self) -> int:
        with self._ledger:
            dropped = super().clear()
            self._consumed += dropped
            self.clears += 1
            self._forget()
        return dropped

    def taken(self) -> Take | None:
        """The oldest take not yet matched with its delivered chunk."""
        with self._ledger:
            return self._takes.popleft() if self._takes else None

    def _arrival(self, position: int) -> float:
        return self._times[bisect.bisect_right(self._ends, position)]

    def _forget(self) -> None:
        """Drop the ledger entries of pushes wholly consumed."""
        done = bisect.bisect_right(self._ends, self._consumed)
        del self._ends[:done], self._times[:done]
