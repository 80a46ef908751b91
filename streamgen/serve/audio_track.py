"""An avatar session's audio out: the audio that drove each frame, sent beside the video on one media clock.

The video track decides, tick by tick (tick k at t0 + k/fps, RTP time k/fps), which frame is shown; the
`MediaClock` hears each decision and places the shown frame's audio (the samples that drove it) at the same
media time: samples [k·S, (k+1)·S) of the audio timeline, S = samples per frame. A tick that re-sends the last
frame (held: the next chunk is late, or the session is paused) or that the video skipped for lateness is
silence. So video frame n, shown at tick k, and the audio that drove it carry the same presentation time
(k/fps), whatever the holds and drops before it.

`PacedAudioTrack` plays that timeline in 20 ms frames, each due at t0 + its start, never before the video has
decided the ticks it covers (at most one frame's wait, as tick k is decided at t0 + k/fps); frames are paced, a
chunk's audio is never sent in a burst. When more than SKIP_S behind (a blocked event loop) it skips ahead, as
the video drops frames it is too late for. aiortc's Opus encoder buffers one frame before its first packet, so
audio leaves about 20 ms after the video of the same media time; the RTP timestamps are equal.
"""
from __future__ import annotations

import asyncio
import fractions
import time
from typing import Protocol

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .frames import Frame, FrameQueue

FRAME_S = 0.02
SKIP_S = 0.2
KEEP_TICKS = 64  # shown frames' audio kept for a reader that is behind (4 s at 16 fps); older is dropped


class Live(Protocol):
    queue: FrameQueue  # closed when the session ends


class MediaClock:
    """One connection's media timeline: the video's tick decisions and the audio they place."""

    def __init__(self, sample_rate: int, samples_per_tick: int) -> None:
        self.sample_rate, self.samples_per_tick = sample_rate, samples_per_tick
        self.t0: float | None = None
        self.decided = -1  # the last tick the video decided
        self._audio: dict[int, np.ndarray] = {}  # tick → the shown frame's samples, until read
        self._changed = asyncio.Event()

    def show(self, t0: float, tick: int, frame: Frame | None) -> None:
        """The video track decided tick `tick`: `frame` is shown new there (None: held, silence)."""
        self.t0, self.decided = t0, tick
        if frame is not None and frame.sound is not None:
            self._audio[tick] = frame.sound.samples
        for old in [k for k in self._audio if k < tick - KEEP_TICKS]:
            del self._audio[old]
        self._changed.set()

    async def until(self, tick: int, live: Live) -> float:
        """Wait until the video has decided `tick` (-1: started); returns t0."""
        while self.decided < tick or self.t0 is None:
            if live.queue.closed:
                raise MediaStreamError
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        return self.t0

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples [start, start + n) of the timeline (decided ticks only); ticks read to their end are let go."""
        out = np.zeros(n, np.float32)
        size = self.samples_per_tick
        for tick in range(start // size, (start + n - 1) // size + 1):
            samples = self._audio.get(tick)
            if samples is not None:
                lo, hi = max(start, tick * size), min(start + n, (tick + 1) * size)
                out[lo - start:hi - start] = samples[lo - tick * size:hi - tick * size]
                if hi == (tick + 1) * size:
                    del self._audio[tick]
        return out


class PacedAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, clock: MediaClock, live: Live) -> None:
        super().__init__()
        self.clock, self.live = clock, live
        self.size = round(clock.sample_rate * FRAME_S)
        self._next = 0  # the next 20 ms frame of the timeline

    async def recv(self) -> av.AudioFrame:
        t0 = await self.clock.until(-1, self.live)
        m = self._next
        await asyncio.sleep(max(0.0, t0 + m * FRAME_S - time.monotonic()))
        behind = int((time.monotonic() - t0) / FRAME_S) - m
        if behind * FRAME_S > SKIP_S:
            m += behind
        start = m * self.size
        await self.clock.until((start + self.size - 1) // self.clock.samples_per_tick, self.live)
        if self.readyState != "live":
            raise MediaStreamError
        self._next = m + 1
        return self._frame(self.clock.read(start, self.size), start)

    def _frame(self, samples: np.ndarray, start: int) -> av.AudioFrame:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = self.clock.sample_rate
        frame.pts, frame.time_base = start, fractions.Fraction(1, self.clock.sample_rate)
        return frame
