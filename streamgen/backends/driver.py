"""Who calls a stream's `next` for a consumer: the handle a backend gives `serve` for each stream.

- `EngineHandle` — the local backend: the stream is a request of the model's engine loop (one
  thread, one batched forward per shape per tick, for every stream).
- `ThreadDriver` — backends whose streams compute elsewhere (Ray): a thread per stream drives
  `next()`, which mostly waits on remote calls; the remote side batches across streams itself.

Both take the same `ChunkSink` (pacing, delivery, failure) and expose pause / resume / wake / stop.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Protocol

from ..engine.frame_stream import FrameStream
from ..engine.scheduler import ChunkSink, Engine, RequestState, StreamRequest


class StreamHandle(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def wake(self) -> None:
        """The sink may want a chunk now (a frame was consumed, a control queued)."""

    def stop(self) -> Future:
        """No more chunks; resolves once nothing touches the stream any more."""


class EngineHandle:
    def __init__(self, engine: Engine, request: StreamRequest) -> None:
        self.engine, self.request = engine, request

    def pause(self) -> None:
        self.engine.pause(self.request)

    def resume(self) -> None:
        self.engine.resume(self.request)

    def wake(self) -> None:
        self.engine.wake()

    def stop(self) -> Future:
        return self.engine.remove(self.request)


class ThreadDriver:
    """A thread that starts a chunk whenever the sink wants one (and the stream is not paused)."""

    def __init__(self, name: str, stream: FrameStream, sink: ChunkSink, idle_s: float = 0.05) -> None:
        self.stream, self.sink, self.idle_s = stream, sink, idle_s
        self.state = RequestState.RUNNING
        self._wake = threading.Event()
        self._done: Future = Future()
        self._thread = threading.Thread(target=self._run, name=f"drive-{name}", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        if self.state is RequestState.RUNNING:
            self.state = RequestState.PAUSED

    def resume(self) -> None:
        if self.state is RequestState.PAUSED:
            self.state = RequestState.RUNNING
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> Future:
        if self.state in (RequestState.RUNNING, RequestState.PAUSED):
            self.state = RequestState.FINISHED
        self._wake.set()
        return self._done

    def _run(self) -> None:
        try:
            while self.state in (RequestState.RUNNING, RequestState.PAUSED):
                self._wake.clear()
                runnable = self.state is RequestState.RUNNING or self.stream.reset_pending
                if not (runnable and self.sink.wants_chunk()):
                    self._wake.wait(self.idle_s)
                    continue
                started = time.perf_counter()
                try:
                    chunk = self.stream.next()
                except Exception as exc:
                    self.state = RequestState.FAILED
                    self.sink.fail(exc)
                    return
                if self.state is not RequestState.FINISHED:
                    self.sink.deliver(chunk, time.perf_counter() - started)
        finally:
            self._done.set_result(self.state)
