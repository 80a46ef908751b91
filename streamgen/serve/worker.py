"""The generation thread of one session: `FrameStream.next()` in a loop, off the event loop.

Torch releases the GIL inside its kernels, so one thread per session keeps the event loop (signaling,
data channels, packetization) responsive while chunks compute. A chunk starts just in time: when
the frames still queued cover its expected compute time (with a margin), so generation runs as
little ahead of playback as it can without starving it, and a paused or absent viewer costs nothing.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from ..engine.frame_stream import FrameChunk, FrameStream
from .encoder import DisplayScaler
from .frames import Frame, FrameQueue

ChunkCallback = Callable[[FrameChunk, float, int], None]  # (chunk, seconds it took, frames flushed by a reset)
MARGIN = 1.5  # start the next chunk when queued frames cover 1.5× its expected compute time, plus a frame


class GenerationWorker:
    def __init__(self, name: str, stream: FrameStream, queue: FrameQueue, scaler: DisplayScaler, max_chunks: int,
                 on_chunk: ChunkCallback, on_error: Callable[[BaseException], None]) -> None:
        self.stream = stream
        self.queue = queue
        self.scaler = scaler
        self.max_chunks = max_chunks
        self.on_chunk = on_chunk
        self.on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current chunk (a waiting thread is released at once)."""
        self._stop.set()
        self.queue.close()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        expected: float | None = None  # moving average of chunk compute time, seconds
        size = 0  # frames per chunk, from the last chunk
        while not self._stop.is_set():
            if expected is not None:
                ahead = min((self.max_chunks - 1) * size, math.ceil(expected * self.stream.fps * MARGIN) + 1)
                if not self.queue.wait_room(ahead):
                    return
            born = time.monotonic()
            try:
                chunk = self.stream.next()
                images = self.scaler(chunk.frames.cpu().numpy())
            except Exception as exc:  # reported to the viewer; the session closes
                self.on_error(exc)
                return
            seconds = time.monotonic() - born
            expected = seconds if expected is None else 0.7 * expected + 0.3 * seconds
            size = len(images)
            flushed = self.queue.flush() if any(a.of == "reset" for a in chunk.acks) else 0
            self.on_chunk(chunk, seconds, flushed)
            if not self.queue.put([Frame(chunk.first_frame + i, image, born) for i, image in enumerate(images)]):
                return
