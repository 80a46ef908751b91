"""The video track: a session's frames at the model's frame rate, paced by media timestamps.

Tick k is due at t0 + k/fps and carries RTP timestamp k·90000/fps. A tick that finds no new frame
(first chunk still computing on resume, pause, a model slower than real time) re-sends the last one;
a tick that comes late skips the ticks it missed and drops as many queued frames, so playback keeps
to the wall clock instead of falling behind it. With a `MediaClock` (an avatar session) each tick's decision
is announced to it, so the audio track plays a frame's audio at that frame's media time.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .audio_track import MediaClock
from .encoder import VideoEncoder
from .frames import Frame, FrameQueue


class FrameSource(Protocol):
    """What the track needs from its session."""

    queue: FrameQueue
    paused: bool
    last: Frame | None

    def on_sent(self, frame: Frame, new: bool, dropped: int) -> None: ...

    def on_packet(self, packet: av.Packet, encoder: VideoEncoder) -> None:
        """Each packet as it goes out (a recording takes it)."""


class PacedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, source: FrameSource, encoder: VideoEncoder, fps: float, clock: MediaClock | None = None) -> None:
        super().__init__()
        self.source = source
        self.encoder = encoder
        self.fps = fps
        self.clock = clock
        self._t0: float | None = None
        self._tick = 0

    async def recv(self) -> av.Packet:
        loop = asyncio.get_running_loop()
        while True:
            frame, new, dropped = await self._next_frame()
            if self.clock is not None:
                assert self._t0 is not None
                self.clock.show(self._t0, self._tick, frame if new else None)
            packet = await loop.run_in_executor(None, self.encoder.encode, frame.image, self._tick)
            self.source.on_sent(frame, new, dropped)
            if packet is not None:  # an encoder may skip a frame to hold its rate: nothing to send this tick
                self.source.on_packet(packet, self.encoder)
                return packet

    async def _next_frame(self) -> tuple[Frame, bool, int]:
        """The frame for the next due tick: (frame, whether it is new, frames dropped for lateness)."""
        if self._t0 is None:
            while self.source.last is None and not await self.source.queue.wait(0.25):
                self._check_live()
            self._t0 = time.monotonic()
        else:
            self._tick += 1
            await asyncio.sleep(max(0.0, self._t0 + self._tick / self.fps - time.monotonic()))
        self._check_live()
        late = int((time.monotonic() - self._t0) * self.fps) - self._tick
        self._tick += max(0, late)
        if self.source.paused and self.source.last is not None:
            frame, dropped = None, 0
        else:
            frame, dropped = self.source.queue.pop(late=max(0, late))
        if frame is None:
            assert self.source.last is not None
            return self.source.last, False, dropped
        return frame, True, dropped

    def _check_live(self) -> None:
        """End the track when it was stopped or its session closed."""
        if self.readyState != "live" or self.source.queue.closed:
            raise MediaStreamError

